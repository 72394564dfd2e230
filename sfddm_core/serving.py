"""The registered student as an MLflow pyfunc model, defined from code: MLflow runs this file to load
the model, so nothing is pickled. It imports sfddm_core absolutely because it runs as a script; the
registry ships a copy of sfddm_core with the model (code_paths).

Input: a DataFrame, one request per row: num_images (1 to MAX_IMAGES), seed (0 to MAX_SEED) and
optionally num_inference_steps (1 to the student's T'; fewer than T' take a trailing subset of its
steps, as in diffusers' pipelines). The steps column is optional as a whole: without it every row
takes all T' steps; with it every row needs a value (MLflow's schema check refuses nulls in a long).
Output: uint8 images, shape (sum of num_images, H, W, C): row 0's images, then row 1's, and so on.
Image k of a row starts from the noise of seed + k, as in `sfddm sample`, so a row's images do not
depend on the other rows; rows with the same steps are sampled together, in batches, by the sampler of
the method that distilled the student (methods.student_sampler).
A bad value is an MlflowException INVALID_PARAMETER_VALUE: HTTP 400 from `mlflow models serve`.
"""
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from sfddm_core import diffusion, methods, models, samplers
from sfddm_core.io import resolve_device

MAX_IMAGES = 256        # per row: a bound on one request's time and memory
MAX_SEED = np.iinfo(np.int64).max - MAX_IMAGES     # seed + k stays a long, the signature's type
STEPS_COLUMN = "num_inference_steps"


class StudentModel(PythonModel):
    def load_context(self, context):
        self.model = models.load_model(context.artifacts["student"])
        self.sampler = methods.student_sampler(context.artifacts["student"])
        self.device = resolve_device("auto")

    # A DataFrame hint makes MLflow infer no schema from it: the logged signature is the contract.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        rows = [self._request(number, row) for number, row in enumerate(model_input.to_dict("records"))]
        if not rows:
            raise MlflowException.invalid_parameter_value("the request has no rows; expected at least one")
        images = [None] * len(rows)
        for steps in {steps for _, _, steps in rows}:
            group = [number for number, row in enumerate(rows) if row[2] == steps]
            counts = [rows[number][0] for number in group]
            seeds = np.concatenate([rows[number][1] + np.arange(rows[number][0]) for number in group])
            for number, part in zip(group, np.split(self._sample(seeds, steps), np.cumsum(counts)[:-1])):
                images[number] = part
        return np.concatenate(images)

    def _sample(self, seeds: np.ndarray, steps: int) -> np.ndarray:
        timesteps = diffusion.student_timesteps(self.model.num_timesteps, steps, "trailing")
        images, _ = samplers.generate(self.model, seeds, self.sampler, timesteps, device=self.device, desc="serving")
        return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    def _request(self, number: int, row: dict) -> tuple[int, int, int]:
        """(num_images, seed, steps) of one row; steps defaults to all of the student's T'."""
        steps = row.get(STEPS_COLUMN, self.model.num_timesteps)
        return (_integer(number, "num_images", row["num_images"], 1, MAX_IMAGES),
                _integer(number, "seed", row["seed"], 0, MAX_SEED),
                _integer(number, STEPS_COLUMN, steps, 1, self.model.num_timesteps))


def _integer(number: int, name: str, value: int, low: int, high: int) -> int:
    """value if it lies in [low, high], else one line naming the row and the value. (Non-integers never
    get here: MLflow's schema check refuses them, since the signature's columns are longs.)"""
    if not low <= value <= high:
        raise MlflowException.invalid_parameter_value(
            f"row {number}: {name} is {value}; expected an integer from {low} to {high}")
    return int(value)


mlflow.models.set_model(StudentModel())
