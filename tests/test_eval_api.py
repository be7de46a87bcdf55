

def test_an_eps_sweep_is_recorded_and_drawn(trained, data, tmp_path):
    result = iat.evaluate(trained, data, attacks="natural", eps=0.1, n_examples=16, eps_sweep=[0, 0.1, 1],
                          progress=False, out=tmp_path / "eval.json")
    points = result.record.eps_sweep["points"]
    assert [p["eps"] for p in points] == [0.0, 0.1, 1.0] and points[-1]["correct"] == 0
    assert points[0]["correct"] == round(result.accuracy["natural"] * 16)
    assert result.checks["eps_sweep_reaches_zero"] == "pass"
    assert [p.name for p in result.files] == ["eval.json", "eval.csv", "eval.md", "eval-eps-sweep.png"]
