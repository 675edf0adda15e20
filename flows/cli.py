"""The ``clips4`` command line: configs, the artifact store, pipeline runs, serving, and segmentation.

Prefect is imported only by the commands that run flows, so inspecting configs and the store stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from clips4.config import STAGES, ConfigError, list_presets, reference_markdown, resolve_config, to_yaml
from clips4.storage import Store, StoreError, human_bytes

app = typer.Typer(help="CLIP-S4 semantic segmentation without labels, as a resumable pipeline.", no_args_is_help=True)
config_app = typer.Typer(help="Resolve and print configurations.", no_args_is_help=True)
store_app = typer.Typer(help="Inspect and manage the artifact store.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(store_app, name="store")
console = Console()
err = Console(stderr=True, soft_wrap=True)  # one error line, however long

StoreOpt = Annotated[Optional[str], typer.Option("--store", help="Store root (default: $CLIPS4_STORE, else ~/.cache/clips4/store).")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", "-p", help="A preset shipped in clips4/configs (e.g. demo), or see `clips4 config presets`.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="A YAML config file.")]
CheckpointOpt = Annotated[Optional[str], typer.Option(help="Train artifact key or folder (default: newest).")]
OutOpt = Annotated[Path, typer.Option(help="Output folder.")]
DeviceOpt = Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")]
FloorOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Share floor for class names the student was not trained on: each keeps at least this fraction of MaskCLIP's share of the training images' pixels (the demo evaluates with 0.25; evaluate.new_class_floor). 0 turns it off.")]
ScaleOpt = Annotated[Optional[list[float]], typer.Option(help="Input scale: images are resized to this multiple of the student's training size; repeat it to average the embeddings over several scales (the demo evaluates at --scale 2 --scale 3 --scale 4). Default 1.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override, e.g. train.lr=0.02 (repeatable).")]


def fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def load_config(preset: str | None, config: Path | None, overrides: list[str] | None):
    try:
        return resolve_config(preset, config, overrides or [])
    except ConfigError as e:
        fail(str(e))


# ------------------------------------------------------------------------------------------------------- config
@config_app.command("show")
def config_show(preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved configuration as YAML."""
    cfg = load_config(preset, config, set_)
    sys.stdout.write(to_yaml(cfg))


@config_app.command("presets")
def config_presets() -> None:
    """List the presets shipped with clips4."""
    sys.stdout.write("".join(f"{name}\n" for name in list_presets()))


@config_app.command("reference")
def config_reference() -> None:
    """Print the configuration reference (every field, default and meaning) as Markdown."""
    sys.stdout.write(reference_markdown())


# -------------------------------------------------------------------------------------------------------- store
def open_store(store: str | None) -> Store:
    return Store(store)


@store_app.command("ls")
def store_ls(
    kind: Annotated[Optional[str], typer.Argument(help="Only this kind (stage).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON objects instead of a table.")] = False,
    store: StoreOpt = None,
) -> None:
    """List complete artifacts, oldest first."""
    st = open_store(store)
    if kind is not None and kind not in STAGES:
        fail(f"unknown kind {kind!r}; kinds are {', '.join(STAGES)}")
    rows = [
        {"kind": m.kind, "key": m.key, "path": str(st.path(m.key)), "status": m.status, "created": m.created, "size": m.size}
        for m in st.list(kind)
    ]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table("kind", "key", "created", "size", "path")
    for r in rows:
        table.add_row(r["kind"], r["key"], r["created"], human_bytes(r["size"]), r["path"])
    console.print(table if rows else f"no artifacts in {st.root}")


@store_app.command("show")
def store_show(key: str, store: StoreOpt = None) -> None:
    """Print an artifact's manifest, its files and its lineage."""
    st = open_store(store)
    try:
        manifest = st.manifest(key)
        lineage = st.lineage(key)
    except StoreError as e:
        fail(str(e))
    console.print_json(json.dumps({k: v for k, v in manifest.__dict__.items() if k != "files"}, default=str))
    files = Table("file", "size")
    for name, size in manifest.files.items():
        files.add_row(name, human_bytes(size))
    console.print(files)
    console.print("lineage: " + " <- ".join(f"{m.kind}:{m.key}" for m in lineage))


@store_app.command("rm")
def store_rm(
    key: str,
    cascade: Annotated[bool, typer.Option(help="Also remove artifacts built from it.")] = False,
    store: StoreOpt = None,
) -> None:
    """Remove an artifact (refused while downstream artifacts exist, unless --cascade)."""
    try:
        removed = open_store(store).remove(key, cascade=cascade)
    except StoreError as e:
        fail(str(e))
    console.print("removed " + ", ".join(removed))


@store_app.command("gc")
def store_gc(store: StoreOpt = None) -> None:
    """Remove staging debris left by killed writers, and leftover trash."""
    cleaned = open_store(store).gc()
    console.print(f"cleaned {len(cleaned)} item(s)" + "".join(f"\n  {c}" for c in cleaned))


# ---------------------------------------------------------------------------------------------------------- run
@app.command("run")
def run(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    stages: Annotated[Optional[str], typer.Option(help="Comma-separated stages to run (default: all).")] = None,
    force: Annotated[Optional[str], typer.Option(help="Recompute this stage and everything after it.")] = None,
    store: StoreOpt = None,
) -> None:
    """Run the pipeline (or some stages) in-process, reusing every artifact that is already complete.

    Under torchrun the train stage trains with DDP: rank 0 runs the pipeline, the other ranks only train beside it.
    """
    cfg = load_config(preset, config, set_)  # refuse a bad config before Prefect starts
    chosen = [s.strip() for s in stages.split(",")] if stages else list(STAGES)
    from clips4.tasks.preflight import PreflightError, preflight
    from clips4.tasks.train import follow_train, torchrun_rank

    try:  # everything that can fail late fails here, before Prefect starts
        preflight(cfg, chosen, force, open_store(store))
    except (PreflightError, StoreError) as e:
        fail(str(e))

    if torchrun_rank() > 0:
        try:
            follow_train(cfg, open_store(store), chosen, force, say=err.print)
        except (StoreError, ValueError, OSError) as e:
            fail(str(e), code=1)
        return
    from clips4.flows.pipeline import PipelineError, run_pipeline

    try:
        run_pipeline(preset, str(config) if config else None, set_, chosen, force, store, console)
    except (PipelineError, StoreError, ConfigError, ValueError, OSError) as e:
        fail(str(e), code=1)


@app.command("segment")
def segment(
    images: Annotated[list[Path], typer.Argument(help="Image files to segment.")],
    classes: Annotated[str, typer.Option(help="Class names, comma-separated; 'a | b' gives synonyms of one class.")],
    checkpoint: CheckpointOpt = None,
    out: OutOpt = Path("masks"),
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    scale: ScaleOpt = None,
    new_class_floor: FloorOpt = 0.0,
) -> None:
    """Label maps (palette PNG and raw ids) and overlays for your own images, with any class names."""
    from clips4.tasks.segment import segment_files

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        fail(f"no such image file(s): {', '.join(missing)}")
    try:
        written = segment_files(open_store(store), images, classes, out, checkpoint, device, scales=scale or [1.0],
                                new_class_floor=new_class_floor)
    except (StoreError, ValueError) as e:
        fail(str(e), code=1)
    console.print(f"wrote masks and overlays of {len(written)} image(s) to {out}")


@app.command("export-masks")
def export_masks(
    split: Annotated[str, typer.Option(help="Dataset split to export.")] = "val",
    checkpoint: CheckpointOpt = None,
    out: OutOpt = Path("masks"),
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    scale: ScaleOpt = None,
    new_class_floor: FloorOpt = 0.0,
) -> None:
    """Masks of a whole dataset split, with the dataset's class names (held-out classes included)."""
    from clips4.tasks.segment import export_split

    try:
        count = export_split(open_store(store), split, out, checkpoint, device, scales=scale or [1.0],
                             new_class_floor=new_class_floor)
    except (StoreError, ValueError) as e:
        fail(str(e), code=1)
    console.print(f"wrote masks of {count} image(s) of split {split} to {out}")


GpuSlotsOpt = Annotated[Optional[int], typer.Option(min=1, help="At most this many GPU-bound stages run at once, across all flows and workers (sets the Prefect global concurrency limit 'clips4-gpu'); e.g. 1 per GPU.")]
NameOpt = Annotated[str, typer.Option(help="Deployment name (runs are addressed as FLOW/NAME).")]


@app.command("serve")
def serve_cmd(name: NameOpt = "default", gpu_slots: GpuSlotsOpt = None, store: StoreOpt = None) -> None:
    """Serve the seven flows (clips4-pipeline, clips4-data ... clips4-evaluate) to the Prefect server in
    PREFECT_API_URL, and run what is requested of them in this process."""
    from clips4.flows.serve import serve_all

    serve_all(name, store, gpu_slots)


@app.command("deploy")
def deploy_cmd(
    pool: Annotated[str, typer.Option(help="Prefect work pool whose workers run the flows (must exist).")],
    name: NameOpt = "default",
    image: Annotated[Optional[str], typer.Option(help="Container image with clips4 installed (Docker and Kubernetes pools).")] = None,
    gpu_slots: GpuSlotsOpt = None,
    store: StoreOpt = None,
) -> None:
    """Register the seven flows as deployments on a work pool (process, Docker or Kubernetes)."""
    from clips4.flows.serve import deploy_all

    try:
        ids = deploy_all(pool, name, store, image, gpu_slots)
    except ValueError as e:
        fail(str(e), code=1)
    console.print(f"registered {len(ids)} deployment(s) on work pool {pool}: start one with "
                  f"prefect deployment run 'clips4-pipeline/{name}'")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
