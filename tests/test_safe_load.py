"""Safe checkpoint loading: no arbitrary unpickling, truncation / shape / config-size checks before allocation."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from speechlab.checkpoints.safe_load import (
    CheckpointError,
    TensorInfo,
    UnsafeCheckpointError,
    check_config_limits,
    check_state_dict,
    load_safetensors,
    load_torch_checkpoint,
    read_safetensors_header,
)


class _WritesMarker:
    """Unpickling this object runs code: it writes ``path`` (the classic malicious-pickle pattern)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').write('code ran')",))


def _malicious_checkpoint(tmp_path: Path, marker: Path) -> Path:
    path = tmp_path / "evil.pt"
    torch.save(
        {"cfg": {"encoder_layers": 2}, "model": {"w": torch.zeros(2)}, "payload": _WritesMarker(marker)}, path
    )
    return path


def test_malicious_pickle_would_run_code_with_plain_torch_load(tmp_path):
    # control: the crafted file really executes code when unpickled without weights_only
    marker = tmp_path / "control_marker"
    path = _malicious_checkpoint(tmp_path, marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_unsafe_pickle_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = _malicious_checkpoint(tmp_path, marker)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_torch_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "'exec'" in message and "arbitrary code" in message
    assert not marker.exists()


def test_load_api_refuses_unsafe_pt_without_running_it(tmp_path):
    from speechlab.api import load

    marker = tmp_path / "marker"
    path = _malicious_checkpoint(tmp_path, marker)
    with pytest.raises(UnsafeCheckpointError):
        load(path)
    assert not marker.exists()


def test_plain_checkpoint_loads_with_weights_only(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"cfg": {"encoder_layers": 2}, "model": {"w": torch.arange(4.0)}}, path)
    loaded = load_torch_checkpoint(path)
    assert loaded["cfg"] == {"encoder_layers": 2}
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))


def test_truncated_torch_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"model": {"w": torch.randn(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_torch_checkpoint(path)


def test_non_checkpoint_file_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_torch_checkpoint(path)


def test_truncated_safetensors_is_refused_naming_the_tensor(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(10, 10), "b": torch.randn(100, 10)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"truncated") as info:
        read_safetensors_header(path)
    assert "'b'" in str(info.value)


def test_header_length_beyond_file_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="header claims"):
        read_safetensors_header(path)


def test_huge_shape_in_header_is_refused_before_reading_data(tmp_path):
    # a header promising a 4 TB tensor backed by 16 bytes: rejected from the header alone
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="needs 4000000000000 bytes"):
        load_safetensors(path)


def test_expected_shapes_are_checked_before_loading(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.randn(4, 3), "extra": torch.zeros(1)}, str(path))
    expected = {"weight": TensorInfo((4, 4), torch.float32), "bias": TensorInfo((4,), torch.float32)}
    with pytest.raises(CheckpointError) as info:
        load_safetensors(path, expected=expected)
    message = str(info.value)
    assert "1 missing keys: bias" in message
    assert "1 unexpected keys: extra" in message
    assert "weight: checkpoint [4, 3] vs model [4, 4]" in message


def test_integer_tensor_for_float_parameter_is_a_dtype_mismatch():
    with pytest.raises(CheckpointError, match="dtype torch.int64"):
        check_state_dict({"w": torch.zeros(3, dtype=torch.int64)}, {"w": torch.zeros(3)}, source="x")
    # float precision differences are allowed (cast on load)
    check_state_dict({"w": torch.zeros(3, dtype=torch.float16)}, {"w": torch.zeros(3)}, source="x")


@pytest.mark.parametrize(
    "values, match",
    [
        ({"hidden_size": 10**7}, "hidden_size=10000000"),
        ({"num_layers": -1}, "num_layers=-1"),
        ({"conv_dim": [512, 10**9]}, "conv_dim"),
        ({"num_layers": 250, "hidden_size": 16000}, "B parameters"),
        ({"encoder": {"hidden_size": float("nan")}}, "encoder.hidden_size"),
    ],
)
def test_absurd_config_values_are_refused(values, match):
    with pytest.raises(CheckpointError, match=match):
        check_config_limits(values, source="config.json")


def test_reasonable_config_passes():
    check_config_limits({"hidden_size": 1024, "num_layers": 24, "conv_layers": [[512, 10, 5]]}, source="c")
