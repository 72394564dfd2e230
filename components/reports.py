"""The evaluation as the KFP UI shows it: the FID table as Markdown, the PNGs as one HTML page.

These functions are embedded into the evaluate component (`additional_funcs`), so they import what they
use inside their bodies, like a component does.
"""


def fid_table_markdown(metrics: dict, reference: str) -> str:
    """One row per sampler (FID, KID with its spread over subsets, NFE, speed), then what the numbers
    depend on: sample count, reference set and feature network."""
    labels = {"teacher_ddpm": "teacher, DDPM over all T steps",
              "teacher_ddim": "teacher, DDIM on the student's steps",
              "student": "student (SFDDM)"}
    lines = ["| sampler | steps (NFE) | FID | KID | images/s |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, fid in metrics["fid"].items():
        lines.append(f"| {labels.get(name, name)} | {metrics['nfe'][name]} | {fid:.2f} | "
                     f"{metrics['kid'][name]:.4g} ± {metrics['kid_std'][name]:.2g} | "
                     f"{metrics['images_per_second'][name]:.1f} |")
    lines += [
        "",
        f"Consistency ratio of the student with the teacher's ODE (unclipped DDIM over all T steps) from the same noise: "
        f"**{metrics['consistency_ratio']:.3f}** (0: the same images; about 1: unrelated ones).",
        "",
        f"FID from {metrics['num_samples']} samples per sampler against {reference}, "
        f"features: {metrics['feature_network']}. Compare FIDs only at equal sample count, "
        "reference set and feature network.",
    ]
    return "\n".join(lines) + "\n"


def sample_grids_html(image_dir: str) -> str:
    """Every PNG of the folder, inlined as base64 so that the page needs nothing else."""
    import base64
    import html
    from pathlib import Path

    figures = []
    for png in sorted(Path(image_dir).glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        caption = html.escape(png.stem.replace("_", " "))
        figures.append(
            f'<figure><img alt="{caption}" src="data:image/png;base64,{data}" '
            'style="width: 100%; max-width: 640px; image-rendering: pixelated">'
            f"<figcaption>{caption}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>sfddm samples</title></head>"
            "<body style=\"font-family: sans-serif\">\n" + "\n".join(figures) + "\n</body></html>\n")
