"""``hmmirror guest build|selftest|run``: a real 6.12 kernel with test_hmm under QEMU (docs/fidelity.md).

``build`` fetches ``linux-source-6.12`` with apt when it is missing (root), builds the minimal kernel and the
static helpers and caches them; ``selftest`` boots the guest and runs the kernel's own hmm-tests; ``run``
plays scenario files inside the guest and prints what the real kernel did.  Missing prerequisites
(packages, root for apt, disk space, QEMU) end with one line and exit code 2; a failed build or a guest that
does not finish with exit code 1; Ctrl-C with 130 (QEMU is killed, temporary files removed).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from hmmirror.errors import InputError


def _fail(code: int, message: str) -> None:
    click.echo("hmmirror: error: " + " | ".join(message.splitlines()), err=True)
    sys.exit(code)


def ensure_guest(quiet: bool = False, install: bool = True, force: bool = False) -> Any:
    """Built artifacts (building them with a progress display when needed); exits 2/1 on failure."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from hmmirror.live.guest import build

    if not force:
        art = build.cached()
        if art is not None:
            return art
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=quiet) as prog:
        tasks: dict[str, Any] = {}

        def progress(step: str, done: int | None, total: int | None) -> None:
            if step not in tasks:
                for t in tasks.values():
                    prog.update(t, completed=prog.tasks[t].total or 1, total=prog.tasks[t].total or 1)
                tasks[step] = prog.add_task(step, total=total)
            prog.update(tasks[step], completed=done or 0, total=total)

        def log(msg: str) -> None:
            if not quiet:
                console.print(f"[dim]{msg}[/]")

        try:
            return build.ensure_built(progress, install=install, log=log, force=force)
        except build.Missing as exc:
            _fail(2, "the guest cannot be built here: " + "; ".join(exc.items))
        except build.BuildFailed as exc:
            _fail(1, str(exc))
    raise AssertionError("unreachable")


def _need_qemu() -> None:
    from hmmirror.live.guest import build

    try:
        build.check_prerequisites(install=True, need_build=False)
    except build.Missing as exc:
        _fail(2, "the guest cannot run here: " + "; ".join(exc.items))


def _interruptible(fn: Callable[[], Any]) -> Any:
    from hmmirror.live.guest import vm

    try:
        return fn()
    except KeyboardInterrupt:
        click.echo("hmmirror: interrupted", err=True)
        sys.exit(130)
    except vm.GuestError as exc:
        tail = exc.tail()
        _fail(1, f"{exc}" + (f"; last console lines:\n{tail}" if tail else ""))


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Ctrl-C anywhere in a command: exit code 130 (QEMU and the build are stopped by their own cleanup)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("hmmirror: interrupted", err=True)
            sys.exit(130)
    return wrapper


def _timeout(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """``--timeout``: finite seconds, 10 to a day (``nan`` and ``inf`` are bad input, exit 2)."""
    from hmmirror.cli.common import finite_seconds

    v = finite_seconds(value, "--timeout")
    assert v is not None
    if not 10 <= v <= 86400:
        raise click.BadParameter(f"{value!r} is not between 10 and 86400 seconds", param_hint="--timeout")
    return v


@click.group()
def command() -> None:
    """A real Linux 6.12 with test_hmm, DEVICE_PRIVATE and emulated pmem, under QEMU."""


@command.command("build")
@click.option("--force", is_flag=True, help="Rebuild even when the cache is complete.")
@click.option("--no-install", is_flag=True, help="Do not apt-get install missing packages.")
@click.option("--json", "as_json", is_flag=True, help="Print the artifacts as JSON.")
@_guarded
def build_cmd(force: bool, no_install: bool, as_json: bool) -> None:
    """Build (or find in the cache) the guest kernel, hmm-tests and the scenario player."""
    art = _interruptible(lambda: ensure_guest(quiet=as_json, install=not no_install, force=force))
    manifest = json.loads((art.kernel_dir / "manifest.json").read_text())
    doc = {"kernel": manifest.get("kernel_release"), "source_version": art.source_version,
           "bzImage": str(art.bzimage), "player": str(art.player), "hmm_tests": str(art.hmm_tests),
           "initramfs": str(art.base_initramfs), "cache": str(art.kernel_dir.parent),
           "compile_seconds": manifest.get("compile_seconds")}
    if as_json:
        click.echo(json.dumps(doc, indent=1))
        return
    click.echo(f"guest kernel {doc['kernel']} (linux-source-6.12 {art.source_version}) ready")
    for k in ("bzImage", "player", "hmm_tests", "initramfs"):
        click.echo(f"  {k:10} {doc[k]}")


@command.command("selftest")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: every test with its status.")
@click.option("--timeout", type=float, default=900.0, show_default=True, callback=_timeout,
              help="Seconds before the guest is stopped (10 to 86400).")
@_guarded
def selftest_cmd(as_json: bool, timeout: float) -> None:
    """Boot the guest and run the kernel's own tools/testing/selftests/mm/hmm-tests.c.

    Exit code 0 when no test failed, 1 when one did, when a test of the source was never reported, or when
    the guest did not finish.
    """
    from rich.console import Console

    from hmmirror.live.guest import jobs

    _need_qemu()
    art = ensure_guest(quiet=as_json)
    console = Console(stderr=True)

    def on_line(line: str) -> None:
        if not as_json and (line.startswith(("ok ", "not ok ")) or "HMMG:" in line):
            console.print(f"[dim]{line.rstrip()}[/]")

    results, job = _interruptible(lambda: jobs.run_selftest(art, timeout, on_line))
    totals = {s: sum(1 for r in results if r.status == s) for s in ("pass", "skip", "fail")}
    # a test the source defines but the harness never reported (a crash mid-run) counts as failed
    reported = {r.name for r in results}
    missing = [n for n in jobs.expected_selftests(art) if n not in reported]
    totals["missing"] = len(missing)
    if not results:
        _fail(1, "hmm-tests printed no results; last console lines:\n" +
              "\n".join(job.console.splitlines()[-15:]))
    manifest = json.loads((art.kernel_dir / "manifest.json").read_text())
    if as_json:
        click.echo(json.dumps({"kernel": manifest.get("kernel_release"), "accel": job.accel,
                               "seconds": round(job.seconds, 1), "totals": totals,
                               "tests": [r.to_json() for r in results], "missing": missing}, indent=1))
    else:
        from rich.table import Table

        t = Table("#", "test", "variant", "status", "reason", title=f"hmm-tests on {manifest.get('kernel_release')}"
                  f" ({job.accel}, {job.seconds:.1f} s)", title_justify="left")
        style = {"pass": "green", "skip": "yellow", "fail": "bold red"}
        for r in results:
            t.add_row(str(r.number), r.test, r.variant, f"[{style[r.status]}]{r.status}[/]", r.reason)
        Console().print(t)
        click.echo(f"{totals['pass']} pass, {totals['skip']} skip, {totals['fail']} fail"
                   + (f", {len(missing)} never reported: {' '.join(missing)}" if missing else ""))
    sys.exit(1 if totals["fail"] or missing else 0)


@command.command("run")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: the records of every scenario.")
@click.option("--no-pages", is_flag=True, help="Do not print the per-page tables of inspect operations.")
@_guarded
def run_cmd(files: tuple[str, ...], as_json: bool, no_pages: bool) -> None:
    """Play scenario FILE(s) inside the guest (one boot for all) and print what the real kernel did.

    Exit code 0 when every scenario ran, 1 when one could not run in the guest (the reason is printed).
    """
    from rich.console import Console

    from hmmirror.live.guest import jobs
    from hmmirror.scenario import load

    scenarios = [(f"s{i}", load(f)) for i, f in enumerate(files)]
    _need_qemu()
    art = ensure_guest(quiet=as_json)
    run = _interruptible(lambda: jobs.run_scenarios(art, scenarios))
    release = json.loads((art.kernel_dir / "manifest.json").read_text()).get("kernel_release", "?")
    ok = True
    docs = []
    console = Console()
    for name, scn in scenarios:
        p, res = run.plans[name], run.results.get(name)
        reason = p.skip or (None if res is None or not res.errors else "; ".join(res.errors))
        if res is None and reason is None:
            reason = "the guest did not run it"
        ok = ok and reason is None
        if as_json:
            docs.append({"scenario": scn.file, "title": scn.title, "kernel": f"guest {release}", "skipped": reason,
                         "records": [r.to_json() for r in res.records] if res and not p.skip else []})
        else:
            _print_guest_run(console, scn, res, reason, pages=not no_pages)
    if as_json:
        click.echo(json.dumps(docs[0] if len(docs) == 1 else docs, sort_keys=True))
    sys.exit(0 if ok else 1)


def _print_guest_run(console: Any, scn: Any, res: Any, reason: str | None, pages: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    from hmmirror.scenario.report import pages_table

    title = f"{scn.title or scn.file} (guest kernel)"
    if reason is not None:
        console.print(Text(f"{title}: not run in the guest: {reason}", style="yellow"))
        return
    t = Table(title=title, title_justify="left")
    for col in ("#", "line", "proc", "op", "result", "details"):
        t.add_column(col, justify="right" if col in ("#", "line") else "left", overflow="fold")
    for op, rec in zip(scn.ops, res.records):
        if rec.unsupported:
            result = Text("unsupported", style="yellow")
        elif rec.ok:
            result = Text(hex(rec.ret) if op.name == "mmap" and isinstance(rec.ret, int) else str(rec.ret))
        else:
            result = Text(rec.errno or "failed", style="red")
        details = " ".join(f"{k}={_short(v)}" for k, v in rec.extra.items())
        if rec.signal:
            details = (details + f" signal={rec.signal}").strip()
        if rec.note:
            details = (details + f" ({rec.note})").strip()
        t.add_row(str(op.index), str(op.line or ""), op.proc, op.name, result, details)
    console.print(t)
    if pages:
        for op, rec in zip(scn.ops, res.records):
            if rec.pages is not None:
                console.print(pages_table(rec.pages, f"op {op.index} (inspect, line {op.line}), process {op.proc}: "
                                                     f"{len(rec.pages)} pages"))


def _short(v: Any) -> str:
    if isinstance(v, list):
        text = " ".join(f"{b:02x}" for b in v)
        return text if len(v) <= 32 else text[:95] + f" ... ({len(v)} bytes)"
    return str(v)


__all__ = ["command", "ensure_guest", "InputError"]
