"""Issue 9, item 7: generated malformed scores and plan JSON, plans, counts and texts against the library
and the CLI. The property everywhere: a clear error (ValueError/TypeError with a message, or a CLI
exit != 0 with one ``entrodrop: error:`` line) or a correct result; never another exception, never a
traceback, never exit 0 with a wrong answer."""

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli_errors import scores_dict

from entrodrop.cli import main
from entrodrop.criteria import score_criteria
from entrodrop.data import load_corpus, make_windows
from entrodrop.plan import DropPlan
from entrodrop.scores import Scores
from entrodrop.select import PROTECTIONS, protected_layers, select_blocks

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


def paths_of(data, prefix=()):
    """Every path (tuple of keys / indexes) into nested dicts and lists."""
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from paths_of(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data[:3]):  # the first items are enough to reach every shape
            yield from paths_of(value, (*prefix, i))


def mutate(data, path, value):
    """A deep copy of ``data`` with the value at ``path`` replaced by ``value`` (the root when path is ())."""
    if not path:
        return value
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


VALID_SCORES = scores_dict()
SCORE_PATHS = list(paths_of(VALID_SCORES))
VALID_PLAN = {"num_layers": 4, "criterion": "manual", "meta": {}, "blocks": [
    {"layer": 1, "kind": "attn", "reason": "x"}, {"layer": 2, "kind": "mlp", "reason": "y"}]}
PLAN_PATHS = list(paths_of(VALID_PLAN))


def check_scores_usable(scores: Scores) -> None:
    """Accepted scores must work everywhere they are used: every block, curve and selection."""
    for kind in ("attn", "mlp", "layer"):
        assert [b.layer for b in scores.blocks_of(kind)] == list(range(scores.num_layers))
    for est in scores.estimators:
        assert len(scores.entropy_curve[est]) == scores.num_layers + 1
        plan = select_blocks(scores, "entrodrop", "attn", count=0, estimator=est, protect="none")
        assert len(plan) == 0


@FAST
@given(path=st.sampled_from(SCORE_PATHS), value=json_values)
def test_scores_from_malformed_json(path, value):
    data = mutate(VALID_SCORES, path, value)
    try:
        scores = Scores.from_dict(data)
    except ValueError as exc:
        assert str(exc)
        return
    check_scores_usable(scores)


@FAST
@given(path=st.sampled_from(PLAN_PATHS), value=json_values)
def test_plan_from_malformed_json(path, value):
    data = mutate(VALID_PLAN, path, value)
    try:
        plan = DropPlan.from_dict(data)
    except ValueError as exc:
        assert str(exc)
        return
    assert all(isinstance(b.layer, int) and 0 <= b.layer < plan.num_layers for b in plan.blocks)
    assert DropPlan.from_dict(json.loads(json.dumps(plan.to_dict()))).keys() == plan.keys()


@FAST
@given(text=st.text(alphabet="attnmlpayer:0123456789,- x", max_size=30), num_layers=st.integers(-1, 6))
def test_plan_parse(text, num_layers):
    try:
        plan = DropPlan.parse(text, num_layers)
    except ValueError as exc:
        assert str(exc)
        return
    assert num_layers >= 1 and all(0 <= b.layer < num_layers for b in plan.blocks)
    assert len(plan.keys()) == len(plan.blocks)
    assert DropPlan.parse(plan.compact(), num_layers).keys() == plan.keys()  # compact() is what parse() reads


@FAST
@given(criterion=st.sampled_from([*score_criteria(), "bogus"]), kind=st.sampled_from(["attn", "mlp", "layer", "x"]),
       count=st.one_of(st.none(), st.integers(-2, 8)), fraction=st.one_of(st.none(), st.floats(-0.5, 1.5)),
       protect=st.sampled_from([*PROTECTIONS, None, "bogus"]), layers=st.lists(st.integers(-1, 5), max_size=5),
       num_layers=st.integers(1, 6))
def test_select_blocks_gives_what_was_asked_or_says_why(criterion, kind, count, fraction, protect, layers, num_layers):
    scores = Scores.from_dict(scores_dict(num_layers=num_layers))
    try:
        plan = select_blocks(scores, criterion, kind, count=count, fraction=fraction, protect=protect, layers=layers)
    except ValueError as exc:
        assert str(exc)
        return
    assert all(b.kind == kind and 0 <= b.layer < num_layers for b in plan.blocks)
    if criterion == "manual":
        assert sorted(b.layer for b in plan.blocks) == sorted(set(layers))
        return
    asked = count if count is not None else round(fraction * num_layers)
    assert len(plan.blocks) == asked
    protected = protected_layers(scores, protect or plan.meta["protect"], estimator="bucket")
    assert not {b.layer for b in plan.blocks} & set(protected)


@pytest.fixture(scope="module")
def scores_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FAST
@given(path=st.sampled_from(SCORE_PATHS), value=json_values, count=st.integers(-1, 6),
       kind=st.sampled_from(["attn", "mlp", "layer"]), criterion=st.sampled_from(["entrodrop", "cosine", "angular"]))
def test_cli_select_on_malformed_scores(scores_file, capsys, path, value, count, kind, criterion):
    source, out = scores_file / "s.json", scores_file / "plan.json"
    source.write_text(json.dumps(mutate(VALID_SCORES, path, value)))
    out.unlink(missing_ok=True)
    code = main(["select", str(source), "--count", str(count), "--kind", kind, "--criterion", criterion,
                 "--protect", "none", "--out", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 0:  # a correct answer: exactly the blocks asked for, of the kind asked for
        plan = json.loads(out.read_text())
        assert len(plan["blocks"]) == count and {b["kind"] for b in plan["blocks"]} <= {kind}
    else:
        assert code == 2 and [line for line in err.splitlines() if line.startswith("entrodrop: error:")]


@FAST
@given(raw=st.binary(max_size=64))
def test_cli_select_on_arbitrary_bytes(scores_file, capsys, raw):
    source = scores_file / "raw.json"
    source.write_bytes(raw)
    code = main(["select", str(source), "--count", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.startswith("entrodrop: error:")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300), samples=st.integers(-1, 5), seq_len=st.integers(-1, 40))
def test_windows_from_any_text(tiny_tokenizer, text, samples, seq_len):
    try:
        corpus = load_corpus("text", text=text)
        windows = make_windows(tiny_tokenizer, corpus, num_samples=samples, seq_len=seq_len)
    except ValueError as exc:
        assert str(exc)
        return
    assert windows.ndim == 2 and windows.shape[1] == seq_len and 1 <= windows.shape[0] <= samples


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), suffix=st.sampled_from([".txt", ".jsonl", ".csv"]))
def test_text_files_of_any_bytes(scores_file, raw, suffix):
    path = scores_file / f"doc{suffix}"
    path.write_bytes(raw)
    try:
        corpus = load_corpus(str(path))
    except ValueError as exc:
        assert str(exc)
        return
    assert corpus.name
