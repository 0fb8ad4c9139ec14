"""Tenant isolation (adapter ownership) and Kafka TLS/SASL settings.

The ownership tests run against the real broker and the in-process engine service; the TLS/SASL tests
check the aiokafka kwargs mapping and validation only: no TLS or SASL broker is available here.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import secrets
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from safetensors.torch import load_file

from hotlora.agents import HotLoraClient
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.kafka.convert import ERROR_CODES, error_to_exception, from_engine
from hotlora.engine.kafka.ownership import Forbidden, Owner, OwnerRegistry, OwnershipGate
from hotlora.engine.kafka.security import KafkaSecurity, kafka_kwargs
from hotlora.engine.kafka.service_config import from_sources
from hotlora.engine.types import AdamParams, AdapterInfo, Datum, SamplingParams
from hotlora.schemas import messages as wire
from hotlora.schemas.codec import decode, encode
from tests.helpers import running_engine_service, service_config_for_tests


def run(main: Callable[[], Awaitable[Any]], timeout: float) -> Any:
    return asyncio.run(asyncio.wait_for(main(), timeout))


# ----- the registry (pure) -----


def test_registry_claims_checks_and_releases() -> None:
    reg = OwnerRegistry()
    assert reg.claim("a", "alice", "tok-a") is True
    assert reg.claim("a", "alice", "tok-a") is False  # the owner again: unchanged
    reg.check("a", "alice", "tok-a")
    for principal, token in [("bob", "tok-b"), ("alice", "wrong"), ("alice", ""), ("", ""), ("bob", "tok-a")]:
        with pytest.raises(Forbidden) as info:
            reg.check("a", principal, token)
        assert info.value.code == "forbidden"
        with pytest.raises(Forbidden):
            reg.claim("a", principal, token)
        assert not reg.visible("a", principal, token)
    reg.check("unknown", "bob", "tok-b")  # not ours to refuse: the engine answers unknown_adapter
    # Unowned (created without a principal): open to everyone, and not taken over by a later claim.
    assert reg.claim("anon", "", "") is True
    assert reg.owner("anon") == Owner("")
    reg.check("anon", "", "")
    reg.check("anon", "bob", "tok-b")
    assert reg.claim("anon", "bob", "tok-b") is False and reg.owner("anon") == Owner("")
    with pytest.raises(Forbidden, match="no token"):
        reg.claim("b", "bob", "")
    assert reg.release("a") and not reg.release("a")
    assert reg.claim("a", "bob", "tok-b") is True  # a deleted id is free again


def test_registry_keeps_no_raw_token_and_saves_one_record_per_adapter_atomically(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt" / "owners"
    reg = OwnerRegistry.load(directory)  # no directory yet: empty, bound to it
    token = secrets.token_urlsafe(32)
    reg.claim("a", "alice", token)
    reg.claim("anon", "", "")
    reg.save("a")
    reg.save("anon")
    files = sorted(p.name for p in directory.iterdir())
    assert len(files) == 2 and all(f.endswith(".json") and not f.startswith(".") for f in files)  # no temp files
    text = "".join(p.read_text() for p in directory.iterdir())
    assert token not in text and "alice" in text
    assert all(json.loads(p.read_text())["scheme"] == "hmac-sha256" for p in directory.iterdir())
    again = OwnerRegistry.load(directory)
    assert again.owners == reg.owners
    again.check("a", "alice", token)
    with pytest.raises(Forbidden):
        again.check("a", "alice", token + "x")
    # Same token, another adapter: another salt, so equal tokens do not show as equal digests.
    reg.claim("b", "alice", token)
    assert reg.owners["a"].digest != reg.owners["b"].digest
    # Another engine sharing the directory writes b's record; reload picks up only what it selects.
    reg.save("b")
    again.reload(lambda adapter_id: adapter_id == "b")
    assert "b" in again and "a" in again
    reg.release("a")
    reg.save("a")  # a released owner's record goes
    again.reload(lambda adapter_id: adapter_id == "a")
    assert "a" not in again and "b" in again
    next(directory.iterdir()).write_text("{not json")
    with pytest.raises(ValueError, match="refusing to go on"):
        OwnerRegistry.load(directory)


def test_registry_carries_over_the_legacy_owners_json(tmp_path: Path) -> None:
    old = OwnerRegistry()
    old.claim("a", "alice", "ta")
    legacy = tmp_path / "owners.json"
    owners = {a: {"principal": o.principal, "salt": o.salt, "digest": o.digest} for a, o in old.owners.items()}
    legacy.write_text(json.dumps({"version": 1, "scheme": "hmac-sha256", "owners": owners}))
    reg = OwnerRegistry.load(tmp_path / "owners", legacy=legacy)
    reg.check("a", "alice", "ta")
    with pytest.raises(Forbidden):
        reg.check("a", "bob", "tb")
    assert not legacy.exists() and OwnerRegistry.load(tmp_path / "owners").owners == reg.owners


def _info(adapter_id: str) -> AdapterInfo:
    return AdapterInfo(adapter_id, None, False, 4, 8.0, ("q_proj",), 0, 10)


def test_gate_claims_in_order_and_settles_outcomes(tmp_path: Path) -> None:
    gate = OwnershipGate.load(tmp_path / "owners")
    alice, bob = {"principal": "alice", "token": "ta"}, {"principal": "bob", "token": "tb"}
    create = wire.CreateAdapter(adapter_id="a", **alice)
    gate.admit(create)  # claimed at dispatch, before the engine ran it ...
    with pytest.raises(Forbidden):
        gate.admit(wire.OptimStep(adapter_id="a", **bob))  # ... so a request right behind it is refused
    gate.settle(create, _info("a"))
    assert "a" in OwnerRegistry.load(tmp_path / "owners")  # saved
    failed = wire.CreateAdapter(adapter_id="b", **bob)
    gate.admit(failed)
    gate.settle(failed, Forbidden("e.g. the engine refused it"))  # a failed create gives its claim back
    assert "b" not in gate.registry
    gate.admit(wire.LoadState(adapter_id="c", path="x", **bob))  # load_state of a new id claims it too
    with pytest.raises(Forbidden):
        gate.admit(wire.LoadState(adapter_id="a", path="x", **bob))
    listing = wire.ListAdapters(**bob)
    gate.admit(listing)
    shown = gate.settle(listing, [_info("a"), _info("c"), _info("legacy")])
    assert [i.adapter_id for i in shown] == ["c", "legacy"]
    everyone = gate.settle(wire.ListAdapters(), [_info("a"), _info("c")])
    assert len(everyone) == 2
    delete = wire.DeleteAdapter(adapter_id="a", **alice)
    gate.admit(delete)
    gate.settle(delete, None)
    assert "a" not in OwnerRegistry.load(tmp_path / "owners")


def test_envelope_fields_are_optional_and_never_echoed() -> None:
    old = {
        "type": "optim_step",
        "v": 1,
        "request_id": "r",
        "adapter_id": "a",
        "seq": 1,
        "reply_to": "",
        "sent_at_ms": 0,
    }
    message = decode(msgspec.msgpack.encode(old))
    assert (message.principal, message.token) == ("", "")  # type: ignore[union-attr]
    secret = wire.OptimStep(adapter_id="a", principal="alice", token="s3cret")
    assert decode(encode(secret)) == secret
    reply = from_engine(secret, Forbidden("no"))
    assert b"s3cret" not in encode(reply) and b"alice" not in encode(reply)
    assert isinstance(reply, wire.Error) and reply.code == "forbidden"
    assert ERROR_CODES["forbidden"] is Forbidden
    assert isinstance(error_to_exception(reply), Forbidden)


# ----- against the real broker and engine service -----


def _weights(path: str | Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    assert tensors, f"no safetensors in {path}"
    return tensors


def _bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a
    )


def test_other_principals_are_refused_and_change_nothing(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    checkpoints = tmp_path / "checkpoints"
    config = service_config_for_tests(broker.bootstrap, topic_prefix, tiny_model_path, checkpoints, seq_gap_timeout=2.0)
    token_a, token_b = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    opts: dict[str, Any] = {"request_timeout": 20, "retries": 0}
    datum = Datum.from_sequence([3, 4, 5, 6, 7], prompt_len=2)
    greedy = SamplingParams(max_tokens=3, temperature=0.0)

    async def refused(call: Awaitable[Any]) -> None:
        with pytest.raises(Forbidden) as info:
            await call
        assert info.value.code == "forbidden"

    async def main() -> None:
        # Both clients live across the engine restart, as agents do (their reply topics stay).
        async with (
            HotLoraClient(broker.bootstrap, topic_prefix, principal="alice", token=token_a, **opts) as a,
            HotLoraClient(broker.bootstrap, topic_prefix, principal="bob", token=token_b, **opts) as b,
        ):
            async with running_engine_service(config):
                await a.create_adapter("a-adapter", rank=4, targets="attention")
                await a.forward_backward("a-adapter", [datum])
                assert (await a.optim_step("a-adapter", AdamParams(learning_rate=1e-2))).version == 1
                before = await a.save_state("a-adapter", "before", include_optimizer=True)
                async with (
                    HotLoraClient(broker.bootstrap, topic_prefix, principal="alice", token="wrong", **opts) as fake,
                    HotLoraClient(broker.bootstrap, topic_prefix, principal="", token="", **opts) as anon,
                ):
                    await refused(b.forward_backward("a-adapter", [datum]))
                    await refused(b.optim_step("a-adapter", AdamParams(learning_rate=1.0)))
                    await refused(b.load_state("a-adapter", before.path))
                    await refused(b.delete_adapter("a-adapter"))
                    await refused(b.sample("a-adapter", [3, 4], params=greedy))
                    await refused(b.save_state("a-adapter", "stolen"))
                    await refused(b.create_adapter("a-adapter", rank=4))
                    await refused(fake.optim_step("a-adapter", AdamParams(learning_rate=1.0)))
                    await refused(fake.delete_adapter("a-adapter"))
                    await refused(anon.forward_backward("a-adapter", [datum]))
                    assert "a-adapter" not in [i.adapter_id for i in await b.list_adapters()]
                    # An adapter created without a principal is unowned and keeps working, as before.
                    await anon.create_adapter("anon-adapter", rank=4, targets="attention")
                    await anon.forward_backward("anon-adapter", [datum])
                    assert (await anon.optim_step("anon-adapter")).version == 1
                    assert "anon-adapter" in [i.adapter_id for i in await b.list_adapters()]
                assert not (checkpoints / "stolen").exists()
                mine = {i.adapter_id: i for i in await a.list_adapters()}
                assert mine["a-adapter"].version == 1
                after = await a.save_state("a-adapter", "after", include_optimizer=True)
                assert after.version == 1
                assert _bit_identical(_weights(before.path), _weights(after.path))
            owners = "".join(p.read_text() for p in (checkpoints / "owners").iterdir())
            assert "alice" in owners and token_a not in owners and token_b not in owners

            # A restarted engine keeps the owners: bob is still refused, alice still works.
            async with running_engine_service(config):
                await refused(b.optim_step("a-adapter", AdamParams(learning_rate=1.0)))
                await refused(b.delete_adapter("a-adapter"))
                await a.forward_backward("a-adapter", [datum])
                assert (await a.optim_step("a-adapter", AdamParams(learning_rate=1e-2))).version == 2
                await a.delete_adapter("a-adapter")
            assert "a-adapter" not in OwnerRegistry.load(checkpoints / "owners")

    run(main, timeout=240)


# ----- Kafka TLS / SASL settings -----


def test_plaintext_is_the_default() -> None:
    assert KafkaSecurity().kafka_kwargs() == {"security_protocol": "PLAINTEXT"}
    assert kafka_kwargs(KafkaSecurity.from_env({})) == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "scram-sha-512"])
def test_sasl_plaintext_kwargs(mechanism: str) -> None:
    security = KafkaSecurity("sasl_plaintext", mechanism, "agent", "pw")
    assert security.kafka_kwargs() == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism.upper(),
        "sasl_plain_username": "agent",
        "sasl_plain_password": "pw",
    }
    assert "pw" not in repr(security)


def test_sasl_ssl_from_env_builds_a_verifying_context() -> None:
    env = {
        "HOTLORA_SECURITY_PROTOCOL": "SASL_SSL",
        "HOTLORA_SASL_MECHANISM": "SCRAM-SHA-512",
        "HOTLORA_SASL_USERNAME": "engine",
        "HOTLORA_SASL_PASSWORD": "pw",
    }
    kwargs = KafkaSecurity.from_env(env).kafka_kwargs()
    context = kwargs.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert kwargs == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "engine",
        "sasl_plain_password": "pw",
    }


def test_ssl_loads_ca_and_client_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    kwargs = KafkaSecurity("SSL", ssl_cafile=str(cert), ssl_certfile=str(cert), ssl_keyfile=str(key)).kafka_kwargs()
    assert kwargs["security_protocol"] == "SSL" and isinstance(kwargs["ssl_context"], ssl.SSLContext)
    assert len(kwargs["ssl_context"].get_ca_certs()) == 1
    assert "sasl_mechanism" not in kwargs
    with pytest.raises(ValueError, match="cannot build the Kafka TLS context"):
        KafkaSecurity("SSL", ssl_cafile=str(tmp_path / "missing.pem")).kafka_kwargs()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"security_protocol": "TLS"}, "unknown Kafka security_protocol 'TLS'.*PLAINTEXT, SSL"),
        ({"security_protocol": "SASL_SSL"}, "needs sasl_username and sasl_password"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u"}, "needs sasl_password"),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "sasl_username": "u", "sasl_password": "p"},
            "GSSAPI",
        ),
        ({"ssl_cafile": "/ca.pem"}, "ssl_cafile set but security_protocol is PLAINTEXT"),
        ({"security_protocol": "SSL", "ssl_keyfile": "/k.pem"}, "ssl_keyfile needs ssl_certfile"),
    ],
)
def test_bad_settings_fail_with_a_clear_message(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KafkaSecurity(**settings)


def test_engine_and_client_read_the_same_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"HOTLORA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "HOTLORA_SASL_USERNAME": "u", "HOTLORA_SASL_PASSWORD": "p"}
    config = from_sources(env=env)
    assert config.kafka_security() == KafkaSecurity.from_env(env)
    assert "'p'" not in repr(config)
    with pytest.raises(ValueError, match="needs sasl_password"):
        from_sources(env={"HOTLORA_SECURITY_PROTOCOL": "SASL_SSL", "HOTLORA_SASL_USERNAME": "u"})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOTLORA_PRINCIPAL", "alice")
    monkeypatch.setenv("HOTLORA_TOKEN", "t")
    client = HotLoraClient("localhost:9092")
    assert client.principal == "alice" and client._security["sasl_plain_username"] == "u"
    monkeypatch.delenv("HOTLORA_SASL_PASSWORD")
    with pytest.raises(ValueError, match="needs sasl_password"):
        HotLoraClient("localhost:9092")
    monkeypatch.delenv("HOTLORA_TOKEN")
    with pytest.raises(ValueError, match="needs a token"):
        HotLoraClient("localhost:9092", security=KafkaSecurity())


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    pytest.importorskip("cryptography", reason="makes the test certificate")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hotlora-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_agent_cli_takes_principal_and_token() -> None:
    from hotlora.cli import build_parser

    args = build_parser().parse_args(["agent", "--task", "sft", "--principal", "team-a", "--token", "s3cret"])
    assert (args.principal, args.token) == ("team-a", "s3cret")
    args = build_parser().parse_args(["agent"])
    assert (args.principal, args.token) == (None, None)  # the client then reads HOTLORA_PRINCIPAL / _TOKEN
