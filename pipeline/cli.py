"""`python -m pipeline ...`: run a stage, or show status. See `python -m pipeline --help`."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .errors import ConfigError, command_main, fail  # noqa: F401 - command_main: re-exported
from .redaction import SECRET_KEY, is_secret, redacted  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

USAGE = """\
usage:
  python -m pipeline stage=<name> run_dir=<dir> [input=<manifest>] [launcher=local|slurm]
                     [cluster=generic|a40|a100] [models=real|tiny] [retry_failed=true] [<key>=<value> ...]
  python -m pipeline status run_dir=<dir>        what is done / failed / pending per stage; training runs
                                                 under <dir>: step, losses, latest checkpoint, VQA accuracy
  python -m pipeline verify run_dir=<dir>        check the alignment of every ingested row (exit 1 on violations)
                     [content=true [sample=32]]  ... and the content: a sample of rows' frames (frames=2 per row)
                                                 and audio decoded again by the ffmpeg CLI, text/embeddings vs
                                                 the stage tables
  python -m pipeline report run_dir=<dir>        markdown + PNG run report (<run_dir>/report/)
  python -m pipeline help                        this text
  python -m pipeline stage=<name> [...] --help   every key of that stage, the run, launcher and cluster: type,
                                                 value, note

Stages (in pipeline order): {stages}
Every key of the run (RunConfig), the stage (stage.<key>: its dataclass, e.g. FramesConfig), the launcher
(launcher.<key>) and the cluster profile (cluster.<key>) can be overridden; conf/*.yaml hold only what differs
from the dataclass defaults. A bad key or value is one error line and exit status 2 before anything is written, e.g.
  python -m pipeline stage=download run_dir=runs/r1 input=videos.txt stage.socket_timeout_s=60
  python -m pipeline stage=frames run_dir=runs/r1 launcher=slurm cluster=a40 launcher.array_parallelism=20
A run_dir pins its manifest and shard geometry on the first launch; later stages need only run_dir.
Re-running a stage skips completed shards and resumes partial ones; retry_failed=true re-does failed items.
"""

def check_run_dir(run_dir: Path, min_free_gb: float) -> None:
    """run_dir (or the nearest folder above it that exists) is a writable directory on a filesystem with at least
    `min_free_gb` free. Checked without writing anything; a ConfigError line otherwise."""
    import os

    base = Path(os.path.abspath(run_dir))
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"run_dir {run_dir}: {base} is not a directory")
    try:
        st = os.statvfs(base)
    except OSError as exc:
        raise ConfigError(f"run_dir {run_dir}: cannot stat {base}: {exc.strerror}") from None
    if st.f_flag & os.ST_RDONLY:
        raise ConfigError(f"run_dir {run_dir} is on a read-only filesystem ({base})")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir {run_dir} is not writable ({base}: permission denied)")
    free_gb = st.f_bavail * st.f_frsize / 2**30
    if free_gb < min_free_gb:
        raise ConfigError(f"run_dir {run_dir}: only {free_gb:.2f} GB free on its filesystem ({base}), "
                          f"min_free_gb={min_free_gb:g}")


def _stage_names() -> str:
    from .stages import available

    return ", ".join(available())


def run_stage(overrides: list[str]) -> int:
    result = launch_stage(overrides)
    return 0 if result.ok else 1


def launch_stage(overrides: list[str]):
    """Validate, pin the geometry, launch the incomplete shards; returns the LaunchResult."""
    from .atomic import write_text
    from .config import compose
    from .engine import container, plan_pending
    from .launchers import get_launcher
    from .manifest import load_items, pin_geometry, plan_geometry
    from .shards import ShardStore
    from .stages import get_stage
    from .stages.base import Stage
    from .status import format_status, stage_status, write_summary

    cfg = compose(overrides)
    # Preflight, before anything is written to run_dir: the launcher can run (Slurm answers), run_dir writable
    # with room.
    launcher = get_launcher(cfg.launcher.name)
    launcher.preflight(cfg)
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir, float(cfg.min_free_gb))
    geo, items, is_new = plan_geometry(run_dir, cfg.input, cfg.num_shards, cfg.items_per_shard)
    shards = list(cfg.shards) if cfg.shards is not None else list(range(geo.num_shards))
    bad = [s for s in shards if not 0 <= s < geo.num_shards]
    if bad:
        raise ConfigError(f"shards {bad} out of range: this run has shards 0..{geo.num_shards - 1}")
    stage_cls = get_stage(cfg.stage.name)
    waiting_on_slurm = cfg.launcher.name == "slurm" and cfg.launcher.get("dependency")
    if stage_cls.upstream and not is_new and not waiting_on_slurm:
        for up in stage_cls.upstream:
            missing = [s for s in shards if not ShardStore(run_dir, up, s).is_complete()]
            if missing:
                raise ConfigError(f"stage {cfg.stage.name} needs stage {up} complete first; incomplete shards: "
                                  f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if stage_cls.upstream and is_new:
        raise ConfigError(f"stage {cfg.stage.name} needs the outputs of {', '.join(stage_cls.upstream)}: "
                          f"run those first in {run_dir}")

    # Validated: from here on we write.
    if is_new:
        pin_geometry(run_dir, geo, items)
    by_shard: dict[int, list] = {}
    for it in load_items(run_dir):
        by_shard.setdefault(it.shard, []).append(it)
    to_run = []
    for s in shards:
        store = ShardStore(run_dir, stage_cls.name, s)
        pending, _ = plan_pending(cfg, store, by_shard.get(s, []), stage_cls.upstream)
        if not store.is_complete() or pending:
            to_run.append(s)
    write_text(run_dir / stage_cls.name / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(redacted(container(cfg)))))
    print(f"{stage_cls.name}: {len(to_run)} of {len(shards)} shard(s) to run with launcher={cfg.launcher.name}")
    result = launcher.launch(cfg, to_run)
    if not result.waited:
        if stage_cls.finish.__func__ is not Stage.finish.__func__:
            dependency = cfg.launcher.get("dependency")
            after = result.job_ids or ([dependency.split(":", 1)[1]] if dependency else [])
            if after:
                result.job_ids.append(launcher.submit_finish(cfg, after))
            elif all(ShardStore(run_dir, stage_cls.name, s).is_complete() for s in range(geo.num_shards)):
                result.job_ids += launcher.run_finish(cfg, stage_cls)  # nothing to wait for (cheap when done)
        return result
    write_summary(run_dir, stage_cls.name)
    if result.ok and all(ShardStore(run_dir, stage_cls.name, s).is_complete() for s in range(geo.num_shards)):
        launcher.run_finish(cfg, stage_cls)
    print(format_status(run_dir, [stage_status(run_dir, stage_cls.name, geo.num_shards)]))
    for shard, owner in sorted(result.busy_shards.items()):
        log.warning("shard %s is being run by %s: left to it (on_leased_shard=skip)", shard, owner)
    for shard, err in sorted(result.failed_shards.items()):
        log.error("shard %s did not complete: %s (log: %s)", shard, err, run_dir / stage_cls.name / "logs")
    return result


def show_status(overrides: list[str]) -> int:
    from .status import format_status, format_training_status, run_status

    args = dict(o.split("=", 1) for o in overrides if "=" in o)
    unknown = [o for o in overrides if not o.startswith("run_dir=")]
    if unknown or "run_dir" not in args:
        raise ConfigError("usage: python -m pipeline status run_dir=<dir>")
    if not Path(args["run_dir"]).is_dir():
        raise ConfigError(f"run_dir not found: {args['run_dir']}")
    stages, training = run_status(args["run_dir"]), format_training_status(args["run_dir"])
    if stages or not training:
        print(format_status(args["run_dir"], stages))
    if training:
        print(("\n" if stages else "") + training)
    return 0


def verify(overrides: list[str]) -> int:
    from .verify import cli

    return cli(overrides)


def report(overrides: list[str]) -> int:
    from .report import cli

    return cli(overrides)


COMMANDS = {"status": show_status, "verify": verify, "report": report}


def main(argv: list[str] | None = None) -> int:
    from .logs import configure

    configure()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(stages=_stage_names()))
        return 0 if argv else 2
    try:
        if argv[0] not in COMMANDS and any(a in ("-h", "--help") for a in argv):
            from .config import stage_usage

            print(stage_usage([a for a in argv if a not in ("-h", "--help")]))
            return 0
        if argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        if "=" not in argv[0]:
            raise ConfigError(f"unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}, or stage=<name>")
        return run_stage(argv)
    except ConfigError as exc:
        return fail(str(exc))
    except OSError as exc:
        import errno

        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            return fail(f"{exc.strerror}: {exc.filename or ''} (completed shards and parts are kept; "
                        "free space or fix permissions, then re-run the same command)")
        raise
    except KeyboardInterrupt:
        print("interrupted: completed shards and parts are kept; re-run the same command to resume", file=sys.stderr)
        return 130
