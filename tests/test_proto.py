"""The committed stubs in pictor/v1 must be exactly what grpcio-tools makes from proto/."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_match_proto(tmp_path: Path) -> None:
    grpc_tools = pytest.importorskip("grpc_tools")
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main([
        "protoc", f"-I{ROOT / 'proto'}", f"-I{include}",
        f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
        str(ROOT / "proto/pictor/v1/pictor.proto"),
    ])
    assert rc == 0
    for name in ("pictor_pb2.py", "pictor_pb2.pyi", "pictor_pb2_grpc.py"):
        fresh = (tmp_path / "pictor/v1" / name).read_text()
        committed = (ROOT / "pictor/v1" / name).read_text()
        assert fresh == committed, f"pictor/v1/{name} is stale: run `make proto` and commit"


def test_contract_has_every_call() -> None:
    from pictor.v1 import pictor_pb2

    methods = set(pictor_pb2.DESCRIPTOR.services_by_name["Pictor"].methods_by_name)
    assert methods == {"Classify", "Search", "Embed", "Upsert", "Delete", "Get", "List", "Info"}


def test_classifier_names_follow_the_enum() -> None:
    from pictor.api import CLASSIFIERS
    from pictor.v1 import pictor_pb2

    names = [pictor_pb2.Classifier.Name(i) for i in range(len(CLASSIFIERS))]
    assert names == ["CLASSIFIER_UNSPECIFIED"] + [f"CLASSIFIER_{c.upper()}" for c in CLASSIFIERS[1:]]
    assert len(pictor_pb2.Classifier.keys()) == len(CLASSIFIERS)


def test_server_info_has_the_fields_of_info_response() -> None:
    """The server fills InfoResponse from ServerInfo and the client ServerInfo from InfoResponse,
    both by field name: a field added to one side only would be lost."""
    import dataclasses

    from pictor.api import ServerInfo
    from pictor.v1 import pictor_pb2

    assert {f.name for f in dataclasses.fields(ServerInfo)} == set(pictor_pb2.InfoResponse.DESCRIPTOR.fields_by_name)
