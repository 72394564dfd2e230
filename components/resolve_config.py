from kfp import dsl

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_config(params: str, data_source: str, teacher_timesteps: int, student_steps: int, spacing: str,
                   teacher_iterations: int, distill_iterations: int, fid_num_samples: int) -> str:
    """params.yaml (as JSON) with the pipeline's setting parameters applied, validated once: the config
    every later stage builds its Config from. A setting left at 0 or "" keeps its value in params.

    The config travels as a JSON string, not a dict: KFP stores dicts as protobuf Structs, whose
    numbers are all floats, and the config refuses 1000.0 where it expects an int.
    """
    import json

    import yaml
    from sfddm_core import config

    values = json.loads(params)
    overrides = {
        "data.source": data_source,
        "teacher.num_train_timesteps": teacher_timesteps,
        "student.steps": student_steps,
        # "trailing", "leading" or a list of teacher steps such as "[249, 499, 749, 999]"
        "student.spacing": yaml.safe_load(spacing) if spacing else None,
        "teacher.iterations": teacher_iterations,
        "distill.iterations": distill_iterations,
        "evaluate.num_samples": fid_num_samples,
    }
    for dotted, value in overrides.items():
        if value:
            *sections, key = dotted.split(".")
            node = values
            for section in sections:
                node = node.setdefault(section, {})
            node[key] = value
    return json.dumps(config.to_dict(config.from_dict(values)))
