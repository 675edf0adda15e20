"""The ``clips4`` command line: configs, the artifact store, pipeline runs, serving, and segmentation.

Prefect is imported only by the commands that run flows, so inspecting configs and the store stays fast.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clips4.config import ConfigError, EvaluateConfig, list_presets, reference_markdown, resolve_config, to_yaml
from clips4.storage import Manifest, Store, StoreError, human_bytes
from clips4.tasks.stages import STAGES

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
ScaleOpt = Annotated[Optional[list[float]], typer.Option(help="Input scale: images are resized to this multiple of the student's training size (with --protocol whole or slide: of the short side); repeat it to average over several scales (the demo evaluates at --scale 2 --scale 3 --scale 4). Default 1.")]
ProtocolOpt = Annotated[Optional[str], typer.Option(help="How the student sees each image (evaluate.protocol): 'stored' squashes it to the student's square training input (default), 'whole' resizes it keeping its aspect ratio (--short-side), 'slide' also runs the student on overlapping windows (--crop, --stride).")]
ShortSideOpt = Annotated[Optional[int], typer.Option(help="With --protocol whole or slide: resize each image, aspect ratio kept, to this short side in pixels (evaluate.short_side); default: its own size.")]
CropOpt = Annotated[Optional[int], typer.Option(help="With --protocol slide: window side in pixels (evaluate.crop; default 224).")]
StrideOpt = Annotated[Optional[int], typer.Option(help="With --protocol slide: pixels between windows, at most --crop (evaluate.stride; default 112).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override, e.g. train.lr=0.02 (repeatable).")]


DEBUG_ENV = "CLIPS4_DEBUG"
written_roots: list[Path] = []  # where the running command writes: a full disk without a file name names these


@app.callback()
def options(
    debug: Annotated[bool, typer.Option("--debug", help=f"Show the traceback of an error (or set {DEBUG_ENV}=1).")] = False,
) -> None:
    """Options of every command."""
    written_roots.clear()  # typer's test runner calls the app many times in one process
    if debug:
        os.environ[DEBUG_ENV] = "1"  # also for the processes a run starts


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def say_error(message: str) -> None:
    """The one ``error:`` line that ends a failed command (a multi-line message is joined, markup shown as is)."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    err.print(f"[red]error:[/red] {escape(line)}", highlight=False)


def fail(message: str, code: int = 2) -> None:
    say_error(message)
    raise typer.Exit(code)


def _raised_by_clips4(exc: BaseException) -> bool:
    """Whether clips4 defines the exception's class or raised it itself: clips4 raises RuntimeError for what the user
    can fix (a stage that needs an artifact, a teacher that cannot load), torch raises it for bugs too."""
    if type(exc).__module__.split(".")[0] == "clips4":
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0] == "clips4"


def _describe_os_error(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else ", ".join(map(str, written_roots)) or None
    at = f" ({where})" if where is not None else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device{at}: free space there (or write elsewhere, e.g. --store) and rerun the " \
               f"same command to resume"
    if exc.errno == errno.EROFS:
        return f"read-only file system{at}: write elsewhere (e.g. --store or $CLIPS4_STORE)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{at}: make it writable for this user or write elsewhere (e.g. --store)"
    if exc.strerror and where is not None:
        return f"{exc.strerror.lower()}{at}"
    return str(exc) or type(exc).__name__


def describe(exc: BaseException) -> tuple[str, int] | None:
    """The error line for a user error and the exit code; None for a bug (an error that clips4 did not foresee)."""
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or clips4.flows.server.Interrupted with the signal's number
        signum = getattr(exc, "signum", signal.SIGINT)
        return f"interrupted by {signal.Signals(signum).name}; rerun the same command to resume", 128 + signum
    if isinstance(exc, OSError):
        return _describe_os_error(exc), 1
    if isinstance(exc, json.JSONDecodeError):
        return f"a JSON file is corrupt ({exc}); rerun with --debug to see which, then fix or remove it", 1
    if isinstance(exc, ValueError) or (isinstance(exc, RuntimeError) and _raised_by_clips4(exc)):
        return str(exc) or type(exc).__name__, 1
    return None


def report(exc: BaseException) -> int:
    """Print the error line of ``exc`` (after its traceback with --debug, or when it is a bug); return the exit code."""
    described = describe(exc)
    if described is None or debugging():
        traceback.print_exception(exc)
    if described is None:
        say_error(f"{type(exc).__name__}: {exc} -- this is a bug in clips4; please report it with the traceback above")
        return 1
    message, code = described
    say_error(message)
    return code


@contextmanager
def user_errors() -> Iterator[None]:
    """A user error in a command's work ends it with its error line (exit 1, or 128 + the signal), after its traceback
    with --debug; a bug goes on to :func:`main`. Here rather than in main() alone so that typer's test runner sees
    the line too, and because typer turns a KeyboardInterrupt that leaves the command into a silent exit 130."""
    try:
        yield
    except (typer.Exit, typer.Abort):  # typer's own exits, RuntimeErrors that fail() raises
        raise
    except (Exception, KeyboardInterrupt) as e:
        described = describe(e)
        if described is None:
            raise
        if debugging():
            traceback.print_exception(e)
        fail(*described)


def load_config(preset: str | None, config: Path | None, overrides: list[str] | None):
    try:
        return resolve_config(preset, config, overrides or [])
    except ConfigError as e:
        fail(str(e))


def protocol_settings(protocol: str | None, short_side: int | None, crop: int | None,
                      stride: int | None) -> EvaluateConfig:
    """The evaluate section with the protocol options given on the command line, validated as any config is."""
    given = {"protocol": protocol, "short_side": short_side, "crop": crop, "stride": stride}
    return load_config(None, None, [f"evaluate.{k}={v}" for k, v in given.items() if v is not None]).evaluate


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
    """List complete artifacts, oldest first, then broken ones (unreadable manifest) with the reason."""
    st = open_store(store)
    if kind is not None and kind not in STAGES:
        fail(f"unknown kind {kind!r}; kinds are {', '.join(STAGES)}")
    rows = [
        {"kind": m.kind, "key": m.key, "path": str(st.path(m.key)), "status": m.status, "created": m.created,
         "size": m.size}
        for m in st.list(kind)
    ] + [
        {"kind": b.kind, "key": b.key, "path": str(b.path), "status": b.status, "created": None, "size": None,
         "reason": b.reason}
        for b in st.broken(kind)
    ]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table("kind", "key", "status", "created", "size", "path")
    for r in rows:
        size = "-" if r["size"] is None else human_bytes(r["size"])
        table.add_row(r["kind"], r["key"], r["status"], r["created"] or "-", size, r["path"])
    console.print(table if rows else f"no artifacts in {st.root}")
    for r in rows:
        if "reason" in r:
            console.print(f"{r['key']} is broken: {r['reason']} (`clips4 store rm {r['key']}` removes it)",
                          markup=False, highlight=False, soft_wrap=True)


@store_app.command("show")
def store_show(key: str, store: StoreOpt = None) -> None:
    """Print an artifact's manifest, its files and its lineage (exit 2 when it is missing or broken)."""
    st = open_store(store)
    try:
        manifest = st.manifest(key)
        lineage = st.lineage(key)
    except StoreError as e:
        fail(str(e))
    console.print_json(json.dumps({k: v for k, v in manifest.__dict__.items() if k != "files"}, default=str))
    files = Table("file", "size", "sha256")
    for name, record in manifest.files.items():
        files.add_row(name, human_bytes(record.size), record.sha256[:16] if record.sha256 else "unverified")
    console.print(files)
    console.print("lineage: " + " <- ".join(f"{m.kind}:{m.key}" for m in lineage))


@store_app.command("rm")
def store_rm(
    key: str,
    cascade: Annotated[bool, typer.Option(help="Also remove artifacts built from it.")] = False,
    store: StoreOpt = None,
) -> None:
    """Remove an artifact, broken ones included (refused while downstream artifacts exist, unless --cascade)."""
    try:
        removed = open_store(store).remove(key, cascade=cascade)
    except StoreError as e:
        fail(str(e))
    console.print("removed " + ", ".join(removed))


def parse_duration(text: str) -> float:
    """'90', '30s', '30m', '2h', '1d' -> seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match:
        raise typer.BadParameter(f"{text!r} is not a duration; write e.g. 0, 45s, 30m, 2h or 1d")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


@store_app.command("gc")
def store_gc(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Leave staging folders changed more recently than this (0, 30m, 2h).")
    ] = "1h",
    store: StoreOpt = None,
) -> None:
    """Remove staging debris left by killed writers, and leftover trash (exit 1 when something could not be removed).

    Staging folders whose build is running (lock held) or that changed recently stay; links are never followed."""
    report = open_store(store).gc(older_than=parse_duration(older_than))
    console.print(f"removed {len(report.removed)} item(s)" + "".join(f"\n  {c}" for c in report.removed),
                  markup=False, highlight=False, soft_wrap=True)
    for note in report.skipped:
        console.print(f"left {note}", markup=False, highlight=False, soft_wrap=True)
    for failure in report.failed:
        err.print(failure, markup=False, highlight=False)
    if report.failed:
        raise typer.Exit(1)


LARGE_ARTIFACT = 256 * 2**20  # verifying artifacts this big (bytes) shows a progress bar


@store_app.command("verify")
def store_verify(
    keys: Annotated[Optional[list[str]], typer.Argument(help="Artifact keys (default: every artifact).")] = None,
    store: StoreOpt = None,
) -> None:
    """Check every file of the artifacts against their manifests (size and SHA-256); exit 1 when any is damaged."""
    from clips4.progress import track

    st = open_store(store)

    def progress(manifest: Manifest, names: list[str]) -> Iterable[str]:
        return track(names, f"verifying {manifest.key}", unit="file") if manifest.size >= LARGE_ARTIFACT else names

    try:
        targets = keys or [m.key for m in st.list()] + [b.key for b in st.broken()]
        problems = st.verify(targets, progress=progress)
    except StoreError as e:
        fail(str(e))
    for problem in problems:
        console.print(str(problem), markup=False, highlight=False, soft_wrap=True)
    serious = [p for p in problems if p.serious]
    verdict = f"{len(serious)} damaged or missing file(s) in {len({p.key for p in serious})} artifact(s)"
    console.print(f"verified {len(targets)} artifact(s): {verdict if serious else 'no damage found'}",
                  markup=False, highlight=False)
    if serious:
        raise typer.Exit(1)


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
    SIGTERM or Ctrl-C stops the run (exit 143 or 130) and its temporary Prefect server; rerun to resume.
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
    from clips4.flows.pipeline import run_pipeline
    from clips4.flows.server import terminal_without_tracebacks

    if not debugging():
        terminal_without_tracebacks()
    written_roots.append(open_store(store).root)
    with user_errors():
        run_pipeline(preset, str(config) if config else None, set_, chosen, force, store, console)


def split_overrides(overrides: list[str] | None, names: list[str]) -> dict[str, list[str]]:
    """Each run's overrides: every plain one, then those whose key starts with its name and a colon
    (``voc20:data.root=DIR`` sets voc20's data.root only)."""
    own: dict[str, list[str]] = {name: [] for name in names}
    shared = []
    for text in overrides or []:
        name, colon, rest = text.partition("=")[0].partition(":")
        if not colon:
            shared.append(text)
        elif name in own:
            own[name].append(text.split(":", 1)[1])
        else:
            fail(f"override {text!r} names {name!r}, which is not one of the runs ({', '.join(names)})")
    return {name: shared + mine for name, mine in own.items()}


@app.command("benchmark")
def benchmark(
    presets: Annotated[Optional[str], typer.Option(help="Comma-separated presets, e.g. voc20,context59 (`clips4 config presets` lists them).")] = None,
    config: Annotated[Optional[list[Path]], typer.Option("--config", "-c", help="A YAML config file to run as well (repeatable); its name field, else its file name, names its rows.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override for every run, e.g. teacher.pretrained=FILE; NAME:section.field=value for the run NAME only (a preset, or a config file's name without .yaml), e.g. voc20:data.root=DIR (repeatable).")] = None,
    stages: Annotated[Optional[str], typer.Option(help="Comma-separated stages to run for each; must include evaluate (default: all).")] = None,
    force: Annotated[Optional[str], typer.Option(help="Recompute this stage and everything after it, for each.")] = None,
    out: OutOpt = Path("benchmark"),
    store: StoreOpt = None,
) -> None:
    """Run several presets (and config files) into one store and write one table of their evaluations (a row per
    run and method, a column per metric) to OUT/benchmark.csv and OUT/benchmark.md.

    They run one after another, reusing every artifact that is already complete; rerun to resume.
    """
    sources = [(name.strip(), None) for name in (presets or "").split(",") if name.strip()]
    sources += [(None, str(path)) for path in config or []]
    names = [preset or Path(file).stem for preset, file in sources]
    if not names or len(set(names)) < len(names):
        fail(f"give --presets and/or --config, each once (got {', '.join(names) or 'none'}); e.g. "
             "--presets voc20,context59")
    overrides = split_overrides(set_, names)
    runs = [(preset, file, overrides[name]) for (preset, file), name in zip(sources, names)]
    cfgs = [load_config(preset, Path(file) if file else None, sets) for preset, file, sets in runs]  # before Prefect
    if len({cfg.name for cfg in cfgs}) < len(cfgs):
        fail(f"two runs share a name ({', '.join(cfg.name for cfg in cfgs)}); give each config file its own name field")
    chosen = [s.strip() for s in stages.split(",")] if stages else list(STAGES)
    if "evaluate" not in chosen:
        fail("a benchmark compares evaluations: --stages must include evaluate")
    from clips4.tasks.preflight import PreflightError, preflight_presets
    from clips4.tasks.train import torchrun_rank

    if torchrun_rank() > 0:
        fail("clips4 benchmark runs in one process; train a preset on several GPUs with torchrun ... clips4 run")
    try:  # every run's checks, and room for all of them, before Prefect starts
        preflight_presets(cfgs, chosen, force, open_store(store))
    except (PreflightError, StoreError) as e:
        fail(str(e))
    from clips4.flows.pipeline import BENCHMARK, run_benchmark
    from clips4.flows.server import terminal_without_tracebacks

    if not debugging():
        terminal_without_tracebacks()
    written_roots.extend([open_store(store).root, out])
    with user_errors():
        table = run_benchmark(runs, chosen, force, store, out, console)
    console.print(table.drop(columns="evaluate").to_markdown(index=False, floatfmt=".4g"), markup=False,
                  highlight=False)
    console.print(f"wrote {out / BENCHMARK}.csv and {out / BENCHMARK}.md")


@app.command("segment")
def segment(
    images: Annotated[list[Path], typer.Argument(help="Image files, or folders searched recursively for images; outputs mirror their paths relative to the folder that holds them all.")],
    classes: Annotated[str, typer.Option(help="Class names, comma-separated; 'a | b' gives synonyms of one class.")],
    checkpoint: CheckpointOpt = None,
    out: OutOpt = Path("masks"),
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    scale: ScaleOpt = None,
    new_class_floor: FloorOpt = 0.0,
    max_pixels: Annotated[Optional[int], typer.Option(min=0, help="Refuse images with more pixels, from their header, before the model loads (default: the default of data.max_pixels, 50 million); 0: no limit.")] = None,
    protocol: ProtocolOpt = None,
    short_side: ShortSideOpt = None,
    crop: CropOpt = None,
    stride: StrideOpt = None,
) -> None:
    """Label maps (colour mask and raw ids; 16-bit ids past 255 classes) and overlays for your own images, with any
    class names."""
    from clips4.config import DataConfig
    from clips4.tasks.segment import segment_files

    limit = DataConfig().max_pixels if max_pixels is None else max_pixels or None
    settings = protocol_settings(protocol, short_side, crop, stride)
    st = open_store(store)
    written_roots.append(out)
    with user_errors():
        done = segment_files(st, images, classes, out, checkpoint, device, scales=scale or [1.0],
                             new_class_floor=new_class_floor, max_pixels=limit, evaluate=settings)
    console.print(f"used student {done.student} and teacher {done.teacher} from {st.root}")
    console.print(f"wrote masks and overlays of {len(done.masks)} image(s) to {out}")


@app.command("export-masks")
def export_masks(
    split: Annotated[str, typer.Option(help="Dataset split to export.")] = "val",
    checkpoint: CheckpointOpt = None,
    out: OutOpt = Path("masks"),
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    scale: ScaleOpt = None,
    new_class_floor: FloorOpt = 0.0,
    protocol: ProtocolOpt = None,
    short_side: ShortSideOpt = None,
    crop: CropOpt = None,
    stride: StrideOpt = None,
) -> None:
    """Masks of a whole dataset split, with the dataset's class names (held-out classes included)."""
    from clips4.tasks.segment import export_split

    settings = protocol_settings(protocol, short_side, crop, stride)
    st = open_store(store)
    written_roots.append(out)
    with user_errors():
        done = export_split(st, split, out, checkpoint, device, scales=scale or [1.0], new_class_floor=new_class_floor,
                            evaluate=settings)
    console.print(f"used student {done.student} and teacher {done.teacher} from {st.root}")
    console.print(f"wrote masks of {len(done.masks)} image(s) of split {split} to {out}")


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
    """The ``clips4`` command: whatever fails ends with one ``error:`` line and a non-zero exit code (the traceback
    too only with --debug, or for a bug)."""
    try:
        app()  # exits itself on success, on typer.Exit and on usage errors
    except Exception as e:
        sys.exit(report(e))


if __name__ == "__main__":
    main()
