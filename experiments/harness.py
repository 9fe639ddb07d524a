"""The shared skeleton of the scripts in experiments/: arguments, run-or-resume rows, JSON -> markdown (+ plot).

A script declares its own arguments, then hands the rest to :func:`run_experiment`::

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=64)
    harness.add_arguments(parser, model="jq-llama-small")
    harness.run_experiment(parser, stem=lambda a: "mine", key=("recipe",), run=run, report=report,
                           quick={"calib": 4})

``run(args, results)`` skips the rows ``results.has(...)`` already holds (``--resume``) and calls
``results.add(row)`` for each finished row (``results.add_rows(rows)`` for rows finished together) and
``results.set_meta(...)`` for run-level numbers (each written at once, atomically); ``report(runs, base)`` writes
``<base>.md`` (and a plot) from the saved results only, so ``--report-only`` rebuilds it without running anything.
A script whose older JSON layout differs passes ``legacy`` (a converter applied when reading); ``volatile`` names
arguments that only choose which rows run. A script whose file names depend on the machine (the GPU benchmarks:
``kernels_<gpu>``) names its files after the device in ``stem``; with ``--report-only`` its ``report`` names each
markdown after the JSON it read (``<out>/<json name>.md``), and a bare ``--report-only`` reads every such JSON in
``--out`` through ``report_inputs``.

Results JSON layout (one file per run, owned by the script that writes it)::

    {"script": "baselines", "command": "python experiments/baselines.py ...", "args": {...}, "key": ["recipe"],
     "meta": {...run-level numbers...}, "rows": [{...}, ...]}

Markdown helpers: :class:`Column` + :func:`table` (rows -> a markdown table), :func:`over_seeds` +
:func:`mean_std` (rows of several calibration seeds -> one row per setting, printed as mean ± std),
:func:`reproduce` (the recorded command line), :func:`bullets` (notes a script formats from the run's numbers); plots: :func:`figure`,
:func:`plot_rows`, :func:`save_figure` (matplotlib, Agg); files: :func:`write_text_atomic`.

Every script in experiments/ uses it except the two that train the bundled models, ``train_reference_models.py``
and ``train_long_context.py``. What they produce is model weights exported into packages/jquant-models with a
``reference_info.json``, not rows of results; they resume from the trainer's step checkpoints in their work folder
(``jquant.train``), not from finished rows, so the harness's arguments would mean nothing there (``--resume`` is
always on, ``--out`` is a work folder, ``--report-only`` has no rows to read); and ``train_long_context.py``'s
``prepare`` / ``train`` / ``export`` steps run on different machines with their own files. The report of what was
trained is ``reference_models_report.py``'s table, whose rows start from each model's ``reference_info.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent
# The harness's own arguments, never in a run's recorded arguments (--quick is recorded through the values it sets).
HARNESS_ONLY = ("resume", "out", "report_only", "quick")
# Flags dropped from the recorded command line (with their value where they take one): they never change the rows.
_DROPPED_FLAGS = {"--resume": 0, "--out": 1}

Row = dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser, *, model: str | None = None,
                  seeds: Sequence[int] | None = None) -> None:
    """Add the common arguments to a script's ``parser``.

    ``--model`` (when ``model`` gives its default), ``--seeds`` (when ``seeds`` gives the default list),
    ``--resume``, ``--out`` (default experiments/results), ``--quick`` and ``--report-only [JSON ...]``.
    """
    group = parser.add_argument_group("experiment harness")
    if model is not None:
        group.add_argument("--model", default=model, help="model name (default: %(default)s)")
    if seeds is not None:
        group.add_argument("--seeds", type=int, nargs="+", default=list(seeds), help="seeds (default: %(default)s)")
    group.add_argument("--resume", action="store_true",
                       help="keep the rows of an existing results JSON of the same arguments; run only the others")
    group.add_argument("--out", type=Path, default=RESULTS,
                       help="folder of the JSON, markdown and plot (default: %(default)s)")
    group.add_argument("--quick", action="store_true",
                       help="smoke run: the script's smallest arguments, files named <stem>-quick.*")
    group.add_argument("--report-only", nargs="*", type=Path, default=None, metavar="JSON",
                       help="rebuild the markdown/plot from results JSON files (default: the script's own) "
                            "without running anything")


def run_args(args: argparse.Namespace, volatile: Sequence[str] = ()) -> dict[str, Any]:
    """The arguments that define a run, as they read back from JSON (tuples as lists, paths as strings): every
    argument but the harness-only and ``volatile`` ones."""
    kept = {k: v for k, v in vars(args).items() if k not in HARNESS_ONLY and k not in volatile}
    return json.loads(json.dumps(kept, default=str))


def command_line(argv: Sequence[str] | None = None) -> str:
    """``python <script> <args>`` from ``argv`` (default ``sys.argv``), without --resume and --out.

    The script path is written relative to the repository when it lies inside it.
    """
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    head = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else argv[0]
    kept, rest = [], argv[1:]
    while rest:
        arg, rest = rest[0], rest[1:]
        name = arg.split("=", 1)[0]
        if name in _DROPPED_FLAGS:
            rest = rest[_DROPPED_FLAGS[name] if "=" not in arg else 0:]
        else:
            kept.append(arg)
    return shlex.join(["python", head, *kept])


def _temporary(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path`` (open descriptor, name), readable as the umask allows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Results:
    """A run's results: its arguments, run-level ``meta`` numbers and rows identified by the ``key`` fields.

    Every :meth:`add` and :meth:`set_meta` rewrites ``path`` at once (atomically).
    """

    path: Path
    script: str
    command: str
    args: dict[str, Any]
    key: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    def row_id(self, row: Mapping[str, Any]) -> tuple:
        """The id of ``row``: its values of the key fields."""
        return tuple(row[k] for k in self.key)

    def get(self, **key: Any) -> Row | None:
        """The row whose key fields equal ``key``, or None."""
        wanted = tuple(key[k] for k in self.key)
        return next((r for r in self.rows if self.row_id(r) == wanted), None)

    def has(self, **key: Any) -> bool:
        """Whether a row with these key fields is already present (finished or resumed)."""
        return self.get(**key) is not None

    def add(self, row: Row) -> None:
        """Add (or replace, same id) a finished row and save."""
        self.add_rows([row])

    def add_rows(self, rows: Sequence[Row]) -> None:
        """Add (or replace, same id) several rows finished together (e.g. one benchmark shape) and save once."""
        for row in rows:
            rid = self.row_id(row)
            self.rows = [r for r in self.rows if self.row_id(r) != rid] + [row]
        self.save()

    def set_meta(self, **values: Any) -> None:
        """Record run-level numbers (window counts, timings, ...) and save."""
        self.meta.update(values)
        self.save()

    def to_json(self) -> dict[str, Any]:
        """The JSON layout written to ``path``."""
        return {"script": self.script, "command": self.command, "args": self.args, "key": list(self.key),
                "meta": self.meta, "rows": self.rows}

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def open(cls, path: Path, *, script: str, command: str, args: dict[str, Any], key: Sequence[str],
             resume: bool) -> Results:
        """A new run's results; with ``resume``, the rows (and meta) of ``path`` when it holds the same arguments.

        Resuming a file of other arguments is refused (SystemExit) rather than mixing two runs.
        """
        results = cls(path=path, script=script, command=command, args=args, key=tuple(key))
        if resume and path.is_file():
            old = cls.load(path)
            if old.args != args:
                changed = sorted(k for k in {*args, *old.args} if args.get(k) != old.args.get(k))
                raise SystemExit(f"--resume: {path} was written with other arguments ({', '.join(changed)}); "
                                 "drop --resume to start over")
            results.meta, results.rows = old.meta, old.rows
            print(f"resuming {path}: {len(old.rows)} rows kept", flush=True)
        return results

    @classmethod
    def load(cls, path: Path, legacy: Callable[[Any], dict[str, Any]] | None = None) -> Results:
        """Read a results JSON; a file in a script's older layout goes through ``legacy(data)`` first."""
        data = json.loads(path.read_text())
        if not (isinstance(data, dict) and {"script", "args", "key", "rows"} <= data.keys()):
            if legacy is None:
                raise SystemExit(f"{path} is not a harness results JSON")
            data = legacy(data)
        return cls(path=path, script=data["script"], command=data["command"], args=data["args"],
                   key=tuple(data["key"]), meta=data.get("meta", {}), rows=data["rows"])


def device_stem(args: argparse.Namespace, prefix: str) -> str:
    """``<prefix>_<device kind>`` of this machine for a benchmark's files (``prefix`` alone with --report-only, where
    each report is named after its JSON)."""
    if args.report_only is not None:
        return prefix
    import jax

    return f"{prefix}_" + jax.devices()[0].device_kind.lower().replace(" ", "_")


def device_report_inputs(args: argparse.Namespace, path: Path, prefix: str) -> list[Path]:
    """After a run, its own JSON; with a bare ``--report-only``, every ``<prefix>_*.json`` in --out."""
    if args.report_only is None:
        return [path]
    paths = sorted(args.out.glob(f"{prefix}_*.json"))
    if not paths:
        raise SystemExit(f"--report-only: no {prefix}_*.json in {args.out}")
    return paths


def run_experiment(parser: argparse.ArgumentParser, *, stem: Callable[[argparse.Namespace], str],
                   key: Sequence[str] | Callable[[argparse.Namespace], Sequence[str]],
                   run: Callable[[argparse.Namespace, Results], None],
                   report: Callable[[list[Results], Path], None], quick: Mapping[str, Any] | None = None,
                   legacy: Callable[[Any, argparse.Namespace], dict[str, Any]] | None = None,
                   report_inputs: Callable[[argparse.Namespace, Path], list[Path]] | None = None,
                   volatile: Sequence[str] = (), argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, then either rebuild the report (``--report-only``) or run-or-resume and report.

    ``stem(args)`` names the files: ``<out>/<stem>.json``, and ``report(runs, <out>/<stem>)`` writes
    ``<out>/<stem>.md`` (+ ``.png``). ``key`` names the fields that identify a row (or, for a script whose modes
    write rows of different kinds, is a function of the arguments that returns them). ``quick`` holds the argument
    values of ``--quick`` (set where an argument was left at its default; ``-quick`` is appended to the stem).
    ``legacy(data, args)`` converts a JSON of the script's older layout into the harness layout (``args``: this
    invocation's, for what the old file did not record). ``report_inputs(args, json_path)`` lists the JSON files
    the report reads after a run or with a bare ``--report-only`` (default: the run's own). ``volatile`` names the
    script's arguments that choose which rows run or how progress shows, never what a row holds: they are left out
    of the recorded arguments, so ``--resume`` accepts other values of them. ``argv`` (default ``sys.argv``) is for
    tests.
    """
    args = parser.parse_args(None if argv is None else argv[1:])
    if args.quick:
        for name, value in (quick or {}).items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    name = stem(args) + ("-quick" if args.quick else "")
    path = args.out / f"{name}.json"
    if args.report_only is not None:
        paths = args.report_only or (report_inputs(args, path) if report_inputs else [path])
        if not paths or (missing := [str(p) for p in paths if not Path(p).is_file()]):
            raise SystemExit(f"--report-only: no results JSON to read ({', '.join(missing) if paths else args.out}); "
                             "run the experiment first, or name its JSON files after --report-only.")
    else:
        script = Path(sys.argv[0] if argv is None else argv[0]).stem
        results = Results.open(path, script=script, command=command_line(argv), args=run_args(args, volatile),
                               key=key(args) if callable(key) else key, resume=args.resume)
        run(args, results)
        paths = report_inputs(args, path) if report_inputs else [path]
    adapter = None if legacy is None else (lambda data: legacy(data, args))
    report([Results.load(p, adapter) for p in paths], args.out / name)


@dataclass(frozen=True)
class Column:
    """A markdown table column: ``header``, the row's ``key`` (or a function of the row) and a number format.

    ``fmt`` is a format spec (``".2f"``, ``"+.2f"``); a missing value (None / absent key) prints ``missing``.
    """

    header: str
    key: str | Callable[[Row], Any]
    fmt: str = ""
    missing: str = "–"

    def cell(self, row: Row) -> str:
        value = self.key(row) if callable(self.key) else row.get(self.key)
        return self.missing if value is None else format(value, self.fmt)


def table(rows: Sequence[Row], columns: Sequence[Column]) -> list[str]:
    """A markdown table (header, rule, one line per row)."""
    return ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(c.cell(r) for c in columns) + " |" for r in rows)]


def over_seeds(rows: Sequence[Row], *, by: Sequence[str], values: Sequence[str], seed: str = "seed") -> list[Row]:
    """One row per group of ``rows`` equal in the ``by`` fields (in order of first appearance): the group's first
    row, with each of ``values`` replaced by its mean over the group, ``<value>_std`` its sample standard deviation
    (0 for a single run), ``<value>_runs`` the values in seed order, and ``seeds`` the group's ``seed`` values.
    A value missing from some of a group's rows is averaged over the rows that have it."""
    import statistics

    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in by), []).append(row)
    out = []
    for group in groups.values():
        group = sorted(group, key=lambda r: (r.get(seed) is None, r.get(seed) if r.get(seed) is not None else 0))
        merged = {**group[0], "seeds": [r.get(seed) for r in group]}
        for value in values:
            runs = [r[value] for r in group if r.get(value) is not None]
            if runs:
                merged.update({value: statistics.fmean(runs), f"{value}_runs": runs,
                               f"{value}_std": statistics.stdev(runs) if len(runs) > 1 else 0.0})
        out.append(merged)
    return out


def mean_std(value: str, fmt: str, scale: float = 1.0) -> Callable[[Row], str | None]:
    """A :class:`Column` key that prints an :func:`over_seeds` row's ``value`` times ``scale`` as ``mean ± std``
    (the mean alone for a single run, None where the row has no such value)."""
    def cell(row: Row) -> str | None:
        if row.get(value) is None:
            return None
        text = format(scale * row[value], fmt)
        if len(row.get(f"{value}_runs", [row[value]])) > 1:
            text += " ± " + format(scale * row[f"{value}_std"], fmt.lstrip("+"))
        return text
    return cell


@dataclass(frozen=True)
class Lead:
    """How far a baseline is above a method in one value, from their paired per-seed differences ``base - ours``:
    ``mean`` and its standard error ``se`` (nan for one seed), over ``n`` seeds. A ``value`` named ``kl`` or
    ``kl_<part>`` prints in 1e-3 nats, anything else as perplexity."""

    value: str
    mean: float
    se: float
    n: int

    @property
    def beyond_noise(self) -> bool:
        """Whether the difference exceeds twice its standard error (never for one seed)."""
        return abs(self.mean) > 2 * self.se

    def text(self) -> str:
        """``ppl +0.250 ± 0.010`` / ``KL +1.200e-3 ± 0.100e-3`` (mean ± SE of base - ours; the mean alone for one
        seed)."""
        name, scale, unit = ("KL", 1e3, "e-3") if self.value.split("_")[0] == "kl" else ("ppl", 1.0, "")
        se = f" ± {scale * self.se:.3f}{unit}" if self.n > 1 else ""
        return f"{name} {scale * self.mean:+.3f}{unit}{se}"


def paired_difference(a: Mapping[Any, float], b: Mapping[Any, float]) -> tuple[float, float, int] | None:
    """``a − b`` from two methods' runs by seed (``{seed: value}``): the mean over the seeds both ran, the standard
    error of that paired per-seed difference (nan for one seed) and the number of seeds; a side holding a single run
    keyed ``None`` (a recipe that does not calibrate) pairs with every seed of the other. None where they share no
    seed."""
    import math
    import statistics

    if None in a and len(a) == 1:
        a = dict.fromkeys(b, a[None])
    if None in b and len(b) == 1:
        b = dict.fromkeys(a, b[None])
    diffs = [a[s] - b[s] for s in a if s in b]
    if not diffs:
        return None
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return statistics.fmean(diffs), se, len(diffs)


def plus_minus(diff: tuple[float, float, int] | None, fmt: str, scale: float = 1.0) -> str:
    """``mean ± SE`` of a :func:`paired_difference` times ``scale`` (the mean alone for one seed; ``–`` for none)."""
    import math

    if diff is None:
        return "–"
    mean, se, _ = diff
    return format(scale * mean, fmt) + ("" if math.isnan(se) else " ± " + format(scale * se, fmt.lstrip("+")))


def judge(ppl: tuple[float, float, int] | None, kl: tuple[float, float, int] | None) -> tuple[str, str]:
    """Whether method ``a`` is ``ahead`` of (lower than) / ``behind`` method ``b`` or ``within noise``, from their
    :func:`paired_difference` ``a − b`` in perplexity and in KL to float, and the measure that decided: perplexity
    where its difference is beyond two standard errors, else KL where that one is (one seed decides nothing)."""
    for value, diff in (("ppl", ppl), ("kl", kl)):
        if diff is not None and abs(diff[0]) > 2 * diff[1]:
            return ("ahead" if diff[0] < 0 else "behind"), value
    return "within noise", ""


def in_words(judgement: str, by: str) -> str:
    """``ahead by perplexity``, ``behind by KL``, ``within noise`` (:func:`judge`'s answer in words)."""
    return judgement + {"ppl": " by perplexity", "kl": " by KL", "": ""}[by]


def comparison(ppl: tuple[float, float, int] | None, kl: tuple[float, float, int] | None) -> str:
    """``ppl d ± se, KL d ± se e-3 → judgement`` of method ``a`` − method ``b`` (:func:`judge`)."""
    return (f"ppl {plus_minus(ppl, '+.3f')}" + ("" if kl is None else f", KL {plus_minus(kl, '+.2f', 1e3)}e-3")
            + f" → {in_words(*judge(ppl, kl))}")


def paired_lead(ours: Mapping[Any, float], base: Mapping[Any, float], value: str) -> Lead | None:
    """:class:`Lead` of ``base`` over ``ours`` from their runs by seed (``{seed: value}``); a side run once (a method
    that does not calibrate) pairs with every seed of the other. None where no seed has both."""
    def single(runs: Mapping[Any, float]) -> Mapping[Any, float]:
        return {None: next(iter(runs.values()))} if len(runs) == 1 else runs

    diff = paired_difference(single(base), single(ours))
    return None if diff is None else Lead(value, *diff)


class MethodRuns:
    """Paired comparisons of methods in rows keyed by ``field`` (e.g. ``"setting"`` or ``"bits"``), ``"method"`` and
    ``"seed"``: each call takes the raw rows, the ``field`` value ``at`` and the methods."""

    def __init__(self, field: str):
        self.field = field

    def runs(self, raw: Sequence[Row], at: Any, method: str, value: str) -> dict[Any, float]:
        """``value`` of ``method`` at ``at`` per seed; a single run of a recipe that does not calibrate
        (``calibrates`` False) is keyed ``None`` (it stands for every seed)."""
        rows = [r for r in raw if (r[self.field], r["method"]) == (at, method) and r.get(value) is not None]
        if len(rows) == 1 and rows[0].get("calibrates") is False:
            return {None: rows[0][value]}
        return {r.get("seed"): r[value] for r in rows}

    def paired(self, raw: Sequence[Row], at: Any, a: str, b: str, value: str) -> tuple[float, float, int] | None:
        """Method ``a`` − method ``b`` in ``value`` at ``at`` (:func:`paired_difference`)."""
        return paired_difference(self.runs(raw, at, a, value), self.runs(raw, at, b, value))

    def judge(self, raw: Sequence[Row], at: Any, a: str, b: str) -> tuple[str, str]:
        """:func:`judge` of ``a`` against ``b`` at ``at`` (perplexity, else KL, beyond 2 SE)."""
        return judge(self.paired(raw, at, a, b, "ppl"), self.paired(raw, at, a, b, "kl"))

    def comparison(self, raw: Sequence[Row], at: Any, a: str, b: str) -> str:
        """:func:`comparison` of ``a`` − ``b`` at ``at``."""
        return comparison(self.paired(raw, at, a, b, "ppl"), self.paired(raw, at, a, b, "kl"))


def decide(ppl: Lead | None, kl: Lead | None) -> tuple[str, Lead] | None:
    """:func:`judge` for leads of a baseline over a method: ``ahead`` / ``behind`` / ``within noise`` and the lead
    that decided (perplexity's when neither does). None without a perplexity lead."""
    if ppl is None:
        return None
    judgement, by = judge(*(None if x is None else (-x.mean, x.se, x.n) for x in (ppl, kl)))
    return judgement, kl if by == "kl" else ppl


def reproduce(command: str) -> str:
    """The ``Reproduce:`` sentence of a report, from the command recorded with the run."""
    return f"Reproduce: `{command}`."


VERDICT = "**Verdict:**"
"""The prefix of a report's one verdict line (``results_index`` shows it next to the file)."""


def verdict(text: str) -> str:
    """The report's verdict line: one or two sentences on the paper's (or the target's) claim, formatted by the
    script from the run's numbers, e.g. "reproduced: X beats Y by 0.12 ± 0.03 ...", "not reproduced: ..."."""
    if "\n" in text:
        raise ValueError("verdict: one line of text (the results index shows it in a table cell).")
    return f"{VERDICT} {text}"


def bullets(notes: Sequence[str]) -> list[str]:
    """Markdown bullets of notes (each formatted by the script from the run's numbers)."""
    return [f"- {n}" for n in notes]


def figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 4.0)):
    """A matplotlib figure (Agg backend) and its 2-D array of axes; ``size`` is per panel, in inches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)


def plot_rows(ax, rows: Sequence[Row], *, x: str, y: str, series: str | None = None, kind: str = "line",
              title: str = "", ylabel: str = "", line: str = "o-", **axis: Any) -> None:
    """Plot ``rows`` on ``ax``: ``y`` against ``x``, one line (``kind="line"``, matplotlib format ``line``) or
    bar set (``"bar"``) per distinct value of ``series``. Bars are grouped by ``x`` value in order of first
    appearance; ``axis`` goes to ``ax.set`` (``yscale``, ``ylim``, ...)."""
    groups: dict[Any, list[Row]] = {}
    for r in rows:
        groups.setdefault(r[series] if series else y, []).append(r)
    if kind == "line":
        for label, group in groups.items():
            ax.plot([r[x] for r in group], [r[y] for r in group], line, label=str(label))
    elif kind == "bar":
        xs = list(dict.fromkeys(r[x] for r in rows))
        width = 0.8 / len(groups)
        for i, (label, group) in enumerate(groups.items()):
            at = {r[x]: r[y] for r in group}
            ax.bar([j + i * width for j, v in enumerate(xs) if v in at], [at[v] for v in xs if v in at], width,
                   label=str(label))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(xs))], [str(v) for v in xs])
    else:
        raise ValueError(f"kind must be 'line' or 'bar', not {kind!r}")
    ax.set(title=title, xlabel=x if kind == "line" else "", ylabel=ylabel or y, **axis)
    if series:
        ax.legend(fontsize=7)


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Save ``fig`` as PNG through a temporary file in the same folder, then close it."""
    import matplotlib.pyplot as plt

    fd, tmp = _temporary(path)
    os.close(fd)
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
