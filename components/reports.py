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


def fid_curve_html(csv_path: str, what: str) -> str:
    """FID and KID of the student along distillation (the CSV of `sfddm distill --classifier`: step, fid,
    kid) as one page with an inline SVG plot; `what` says what the numbers depend on."""
    import csv
    import html
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(row["step"]) for row in rows]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2), constrained_layout=True)
    for ax, key in zip(axes, ("fid", "kid")):
        ax.plot(steps, [float(row[key]) for row in rows], marker="o")
        ax.set_xlabel("distillation update")
        ax.set_ylabel(key.upper())
        ax.grid(alpha=0.3)
    svg = io.StringIO()
    figure.savefig(svg, format="svg")
    plt.close(figure)
    table = "".join(f"<tr><td>{row['step']}</td><td>{float(row['fid']):.2f}</td><td>{float(row['kid']):.4g}</td></tr>"
                    for row in rows)
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>sfddm FID along distillation</title>"
            "</head><body style=\"font-family: sans-serif\">\n<h3>FID and KID of the student along distillation</h3>\n"
            + svg.getvalue()[svg.getvalue().index("<svg"):]
            + f"\n<p>{html.escape(what)}</p>\n<table><tr><th>update</th><th>FID</th><th>KID</th></tr>{table}</table>"
            "\n</body></html>\n")
