"""The registered student as an MLflow pyfunc model, defined from code: MLflow runs this file to load
the model, so nothing is pickled. It imports sfddm_core absolutely because it runs as a script; the
registry ships a copy of sfddm_core with the model (code_paths).

Input: a DataFrame whose first row holds num_images, seed and optionally num_inference_steps (fewer
than the student's T' steps: a trailing subset of them, as in diffusers' pipelines). Output: uint8 images, shape (num_images, H, W, C);
image k starts from the noise of seed + k, as in `sfddm sample`.
"""
import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from sfddm_core import diffusion, io, models, samplers
from sfddm_core.io import resolve_device


class StudentModel(PythonModel):
    def load_context(self, context):
        self.model = models.load_model(context.artifacts["student"])
        self.sampler = io.student_provenance(context.artifacts["student"]).get("sampler", "ddim")  # its method's
        self.device = resolve_device("auto")

    # A DataFrame hint makes MLflow infer no schema from it: the logged signature is the contract.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        request = model_input.iloc[0]
        steps = request.get("num_inference_steps")
        timesteps = None if steps is None or np.isnan(steps) else \
            diffusion.student_timesteps(self.model.num_timesteps, int(steps), "trailing")
        seeds = int(request["seed"]) + np.arange(int(request["num_images"]))
        images, _ = samplers.generate(self.model, seeds, self.sampler, timesteps, device=self.device)
        return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


mlflow.models.set_model(StudentModel())
