"""What a pipeline step runs besides the library: the training steps' launcher and TrainJobs, the run
namespace's settings, the GPU profile and the image reference.

- launcher.py: what the teacher and distill steps run: train in the step's pod, or submit a Kubeflow
  Trainer TrainJob, wait for it and collect its outputs;
- trainjob.py: those TrainJobs as plain manifests, and where a stage trains (`placement`);
- settings.py: what every step and TrainJob gets from the run namespace (ConfigMap, Secrets, run id, pod);
- gpu_profile.py: where GPU steps and TrainJobs run (node selector, toleration, accelerator), and the
  GPU smoke test's check that the image's torch computes there;
- image.py: the one image every step runs in, and its reference (commit tag or digest).

Layers, each importing only those to its left:

    sfddm_core  <-  sfddm_runtime  <-  components  <-  pipelines      (and sfddm_cli on top)

sfddm_runtime imports no kfp, components, pipelines or sfddm_cli (tests/test_import_graph.py): it runs
inside a step, where kfp's compiler cannot be imported (settings.py), and a component may import it
without reaching the pipeline that uses the component. It imports kubernetes only where it talks to the
cluster (launcher.TrainJobs).
"""
