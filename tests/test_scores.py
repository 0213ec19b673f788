"""The stage-boundary rule and the scores JSON: new sink-free keys, and files written before them."""

import json

import pytest

from entrodrop.scores import BlockScore, Scores, detect_stage_boundary

# SmolLM2-135M, gsm8k 16 x 256, bucket (measured, rounded): the method's all-token curve collapses at
# X_12 where the attention sink appears; the sink-free curve falls at X_1 and then rises with small dips.
SMOLLM2_ALL = [1450.7, 1366.3, 1391.9, 1393.9, 1414.5, 1446.7, 1452.4, 1458.4, 1452.0, 1451.6, 1457.9, 1457.6,
               864.7, 870.6, 899.1, 918.4, 942.6, 989.3, 1025.0, 1045.1, 1105.2, 1142.6, 1180.4, 1228.0, 1274.7,
               1289.4, 1313.4, 1339.4, 1343.0, 1341.2, 1343.8]
SMOLLM2_SINKFREE = [1450.8, 1368.7, 1419.6, 1418.6, 1431.2, 1458.7, 1462.6, 1466.8, 1460.3, 1458.4, 1462.1, 1473.5,
                    1475.9, 1482.5, 1491.6, 1483.3, 1489.1, 1498.5, 1505.9, 1501.5, 1511.4, 1504.4, 1498.5, 1504.3,
                    1498.6, 1483.6, 1481.6, 1485.6, 1492.9, 1495.9, 1503.7]


def test_boundary_is_the_end_of_the_initial_decline_not_the_global_minimum():
    assert detect_stage_boundary(SMOLLM2_ALL) == 1  # the global minimum (X_12, the sink) is not the boundary
    assert detect_stage_boundary(SMOLLM2_SINKFREE) == 1
    deeper_later = [10, 8, 6, 7, 8, 9, 3, 2, 4, 6]  # a deeper valley after a sustained rise
    assert detect_stage_boundary(deeper_later) == 2


def test_a_bump_while_falling_does_not_end_the_decline():
    assert detect_stage_boundary([10, 8, 8.3, 6, 6.5, 6.4, 8, 9.5, 11]) == 3  # the next values dip below X_1
    assert detect_stage_boundary([10, 8, 8.5, 8.2, 7.0, 7.5, 8, 9]) == 4


def test_a_flat_noisy_stretch_is_not_a_sustained_rise():
    # after X_1 the values wobble by 0.001 (under 1% of the range) and then keep falling
    assert detect_stage_boundary([5, 4, 4.001, 4.0005, 4.001, 3, 2, 2.5, 3, 3.5]) == 6
    assert detect_stage_boundary([5, 4, 4.001, 4.0005, 4.001, 3, 2, 2.5, 3, 3.5], min_rise=0) == 1


def test_boundary_edge_cases():
    assert detect_stage_boundary([1, 2, 3, 4]) == 0  # only rises: no compression stage
    assert detect_stage_boundary([4, 3, 2, 1]) == 3  # only falls
    assert detect_stage_boundary([2, 2, 2]) == 0  # flat
    assert detect_stage_boundary([3, 1, 2]) == 1  # the window shrinks at the end
    assert detect_stage_boundary([7.0]) == 0
    with pytest.raises(ValueError, match="empty"):
        detect_stage_boundary([])
    with pytest.raises(ValueError, match="patience"):
        detect_stage_boundary([1, 2], patience=0)


def _scores(**extra) -> Scores:
    curve = {"bucket": SMOLLM2_ALL[:5]}
    blocks = [BlockScore(i, k, {"bucket": 0.0}, 0.1, 0.05) for i in range(4) for k in ("attn", "mlp", "layer")]
    return Scores(model="toy", num_layers=4, estimators=["bucket"], entropy_curve=curve, mid_entropy={"bucket": [0.0] * 4},
                  stage_boundary={"bucket": 2}, blocks=blocks, angular_matrix=[], **extra)


def test_sinkfree_keys_round_trip_through_json(tmp_path):
    report = {"threshold": 20.0, "streams": [{"stream": "X_3", "count": 2, "max_ratio": 150.0, "positions": {"0": 2},
                                              "token_ids": {"42": 2}}], "first_layer": 3, "excluded_tokens": 2}
    scores = _scores(entropy_curve_sinkfree={"bucket": [5.0, 4.0, 4.5, 5.0, 6.0]},
                     mid_entropy_sinkfree={"bucket": [1.0] * 4}, massive_tokens=report)
    path = tmp_path / "scores.json"
    scores.save(path)
    data = json.loads(path.read_text())
    assert data["entropy_curve_sinkfree"] == {"bucket": [5.0, 4.0, 4.5, 5.0, 6.0]}
    assert data["massive_tokens"]["streams"][0]["positions"] == {"0": 2}
    loaded = Scores.load(path)
    assert loaded.sinkfree_curve("bucket") == [5.0, 4.0, 4.5, 5.0, 6.0]
    assert loaded.sinkfree_mid("bucket") == [1.0] * 4
    assert loaded.massive_tokens == report
    assert loaded.stage_boundary == {"bucket": 2}  # a current file's boundary is kept as written


def test_a_file_written_before_the_sinkfree_keys_loads_and_falls_back_to_all_tokens(tmp_path):
    data = _scores().to_dict()
    for key in ("entropy_curve_sinkfree", "mid_entropy_sinkfree", "massive_tokens"):
        del data[key]
    data["stage_boundary"] = {"bucket": 4}  # what the retired global-minimum rule wrote
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    loaded = Scores.load(path)
    assert loaded.sinkfree_curve("bucket") == loaded.entropy_curve["bucket"]
    assert loaded.sinkfree_mid("bucket") == loaded.mid_entropy["bucket"]
    assert loaded.massive_tokens == {}
    assert loaded.stage_boundary == {"bucket": detect_stage_boundary(SMOLLM2_ALL[:5])} == {"bucket": 1}
