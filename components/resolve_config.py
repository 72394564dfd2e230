from kfp import dsl

from sfddm_runtime.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_config(params: str, settings: str) -> str:
    """params.yaml (as JSON) with `settings` applied, validated once: the config every later stage builds
    its Config from. settings: a YAML mapping of dotted keys, as `sfddm --set` takes them, e.g.
    "{student.steps: 8, distill.iterations: 2000}"; "" changes nothing.

    The config travels as a JSON string, not a dict: KFP stores dicts as protobuf Structs, whose
    numbers are all floats, and the config refuses 1000.0 where it expects an int.
    """
    import json

    from sfddm_core import config, methods

    cfg = config.with_settings_text(json.loads(params), settings)
    methods.checked(cfg)
    return json.dumps(config.to_dict(cfg))
