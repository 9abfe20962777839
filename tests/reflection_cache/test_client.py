"""ReflectionClient against real gRPC reflection servers on 127.0.0.1."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf import descriptor_pb2

from devstack.demo_services import start_demo_server
from policy import Mode, resolve_mode
from reflection_cache import MalformedDescriptors, ReflectionUnavailable, UnknownMethod, UnknownService
from reflection_cache.client import ReflectionClient
from reflection_cache.types import ServiceModes
from tests.support.reflection_servers import compile_proto, reflection_server

ORDERS = "shop.orders.v1.Orders"
ORDERS_ADMIN = "shop.orders.v1.OrdersAdmin"
E = Mode


@pytest.fixture
async def client():
    c = ReflectionClient(deadline=2.0)
    try:
        yield c
    finally:
        await c.close()


def orders_files():
    return compile_proto("shop/orders/v1/orders.proto")


@pytest.mark.parametrize("versions", [("v1",), ("v1alpha",), ("v1", "v1alpha")])
async def test_demo_server_options_through_each_reflection_version(client, versions):
    demo = start_demo_server(reflection=versions)
    try:
        accounts = await client.fetch("rpcauthz.demo.v1.Accounts", demo.address)
        ledger = await client.fetch("rpcauthz.demo.v1.Ledger", demo.address)
    finally:
        demo.stop(grace=0)
    assert dict(accounts.methods) == {
        "ListAccounts": E.ENGINEERS_WITHOUT_APPROVAL, "ReadAccount": E.ENGINEERS_WITH_APPROVAL,
        "UpdateLimits": E.CONTRIBUTORS_WITHOUT_APPROVAL, "CloseAccount": E.CONTRIBUTORS_WITH_APPROVAL,
        "EraseCustomerData": E.BREAK_GLASS_ONLY, "Ping": None}
    assert accounts.service_default is None
    assert dict(ledger.methods) == {"GetBalance": E.ENGINEERS_WITHOUT_APPROVAL,
                                    "PostEntry": None, "WatchEntries": None}
    assert ledger.service_default is E.CONTRIBUTORS_WITH_APPROVAL
    assert client.protocol_of[demo.address] == versions[0]


async def test_v1_is_asked_first_and_v1alpha_only_endpoints_are_remembered(client):
    with reflection_server(orders_files(), [ORDERS], versions=("v1", "v1alpha")) as both:
        await client.fetch(ORDERS, both.address)
        assert [s.streams for s in both.servicers] == [1, 0]
    with reflection_server(orders_files(), [ORDERS], versions=("v1alpha",)) as old:
        await client.fetch(ORDERS, old.address)
        await client.fetch(ORDERS, old.address)
        assert client.protocol_of[old.address] == "v1alpha"
        assert old.servicer.streams == 2  # both fetches reached v1alpha


@pytest.mark.parametrize("include_dependencies", [True, False], ids=["deps-sent", "deps-asked"])
async def test_options_from_an_imported_file_with_transitive_imports(client, include_dependencies):
    with reflection_server(orders_files(), [ORDERS], include_dependencies=include_dependencies) as srv:
        modes = await client.fetch(ORDERS, srv.address)
        asked = set(srv.servicer.file_questions)
    if include_dependencies:
        assert asked == set()  # everything came with the first answer
    else:  # each import asked for once, including the transitive one
        assert asked == {"rpcauthz/v1/options.proto", "shop/common/v1/money.proto",
                         "shop/common/v1/currency.proto", "google/protobuf/descriptor.proto"}
        assert set(srv.servicer.file_questions.values()) == {1}
    assert modes.service_default is E.CONTRIBUTORS_WITHOUT_APPROVAL
    assert modes.mode_for("GetOrder", E.BREAK_GLASS_ONLY) == (E.ENGINEERS_WITHOUT_APPROVAL, "method")
    assert modes.mode_for("Refund", E.ENGINEERS_WITHOUT_APPROVAL) == (E.BREAK_GLASS_ONLY, "method")
    assert modes.mode_for("ListOrders", E.BREAK_GLASS_ONLY) == (E.CONTRIBUTORS_WITHOUT_APPROVAL, "service")


async def test_method_option_then_nothing_falls_to_configured_default(client):
    with reflection_server(orders_files(), [ORDERS_ADMIN]) as srv:
        modes = await client.fetch(ORDERS_ADMIN, srv.address)
    assert modes.service_default is None
    assert modes.mode_for("Purge", E.BREAK_GLASS_ONLY) == (E.CONTRIBUTORS_WITH_APPROVAL, "method")
    assert modes.mode_for("Stats", E.BREAK_GLASS_ONLY) == (E.BREAK_GLASS_ONLY, "default")
    assert modes.mode_for("Stats", E.ENGINEERS_WITH_APPROVAL) == (E.ENGINEERS_WITH_APPROVAL, "default")


async def test_vendored_copy_of_options_at_another_path(client):
    files = compile_proto("billing/v1/billing.proto")
    assert "third_party/rpcauthz/options.proto" in {f.name for f in files}
    assert "rpcauthz/v1/options.proto" not in {f.name for f in files}
    with reflection_server(files, ["billing.v1.Invoices"], include_dependencies=False) as srv:
        modes = await client.fetch("billing.v1.Invoices", srv.address)
    assert dict(modes.methods) == {"GetInvoice": E.ENGINEERS_WITHOUT_APPROVAL, "VoidInvoice": None}
    assert modes.service_default is E.ENGINEERS_WITH_APPROVAL


async def test_service_without_the_extension_has_no_options(client):
    with reflection_server(compile_proto("plain/v1/plain.proto"), ["plain.v1.Plain"]) as srv:
        modes = await client.fetch("plain.v1.Plain", srv.address)
    assert dict(modes.methods) == {"Get": None, "Put": None}
    assert modes.service_default is None
    assert modes.mode_for("Get", E.BREAK_GLASS_ONLY) == (E.BREAK_GLASS_ONLY, "default")


@pytest.mark.parametrize("name", ["shop.orders.v1.Nope", "shop.orders.v1.RefundRequest"],
                         ids=["absent", "a-message-not-a-service"])
async def test_unknown_service_names_service_and_endpoint(client, name):
    with reflection_server(orders_files(), [ORDERS]) as srv:
        with pytest.raises(UnknownService) as e:
            await client.fetch(name, srv.address)
    assert name in str(e.value) and srv.address in str(e.value)


async def test_unreachable_endpoint_is_unavailable(client, port):
    start = time.monotonic()
    with pytest.raises(ReflectionUnavailable) as e:
        await client.fetch(ORDERS, f"127.0.0.1:{port}")
    assert ORDERS in str(e.value) and f"127.0.0.1:{port}" in str(e.value)
    assert time.monotonic() - start < 2.5


async def test_endpoint_without_reflection_is_unavailable(client):
    demo = start_demo_server(reflection=())
    try:
        with pytest.raises(ReflectionUnavailable, match="neither grpc.reflection.v1 nor v1alpha"):
            await client.fetch("rpcauthz.demo.v1.Ledger", demo.address)
    finally:
        demo.stop(grace=0)


async def test_server_error_status_is_unavailable(client):
    with reflection_server(orders_files(), [ORDERS]) as srv:
        srv.servicer.abort = grpc.StatusCode.INTERNAL
        with pytest.raises(ReflectionUnavailable, match="INTERNAL"):
            await client.fetch(ORDERS, srv.address)


async def test_slow_server_past_the_deadline_is_unavailable_quickly(client):
    with reflection_server(orders_files(), [ORDERS], delay=10) as srv:
        start = time.monotonic()
        with pytest.raises(ReflectionUnavailable) as e:
            await client.fetch(ORDERS, srv.address, deadline=0.3)
        took = time.monotonic() - start
    assert "deadline" in str(e.value) and srv.address in str(e.value)
    assert took < 3  # generous: the point is "about the deadline", not the 10 s sleep


def _garbage(_: bytes) -> bytes:
    return b"\xff\xff\xff not a FileDescriptorProto"


def _dangling_type(blob: bytes) -> bytes:
    fdp = descriptor_pb2.FileDescriptorProto.FromString(blob)
    for msg in fdp.message_type:
        for field in msg.field:
            if field.type_name:
                field.type_name = ".shop.common.v1.DoesNotExist"
    return fdp.SerializeToString()


@pytest.mark.parametrize("kwargs,expect", [
    ({"rewrite": _garbage}, "does not parse"),
    ({"rewrite": _dangling_type}, "does not link"),
    ({"hide": ["shop/common/v1/currency.proto"], "include_dependencies": False},
     "imports shop/common/v1/currency.proto, which reflection does not have"),
], ids=["garbage-bytes", "unlinkable", "missing-dependency"])
async def test_malformed_descriptors(client, kwargs, expect):
    with reflection_server(orders_files(), [ORDERS], **kwargs) as srv:
        with pytest.raises(MalformedDescriptors, match=expect) as e:
            await client.fetch(ORDERS, srv.address)
    assert ORDERS in str(e.value) and srv.address in str(e.value)


async def test_extension_with_the_right_name_but_wrong_type_is_refused(client):
    with reflection_server(compile_proto("wrongtype/v1/wrongtype.proto"), ["rpcauthz.v1.Odd"]) as srv:
        with pytest.raises(MalformedDescriptors, match="expected an enum extension"):
            await client.fetch("rpcauthz.v1.Odd", srv.address)


def _chain(length: int) -> list[descriptor_pb2.FileDescriptorProto]:
    """deep/0.proto imports deep/1.proto ... imports deep/{length-1}.proto; service in deep/0."""
    files = []
    for i in reversed(range(length)):
        fdp = descriptor_pb2.FileDescriptorProto(name=f"deep/{i}.proto", package="deep", syntax="proto3")
        if i + 1 < length:
            fdp.dependency.append(f"deep/{i + 1}.proto")
        fdp.message_type.add(name=f"M{i}")
        if i == 0:
            svc = fdp.service.add(name="Deep")
            svc.method.add(name="Go", input_type=".deep.M0", output_type=".deep.M0")
        files.append(fdp)
    return files


async def test_import_graph_is_bounded_in_depth_and_count():
    files = _chain(12)
    with reflection_server(files, ["deep.Deep"], include_dependencies=False) as srv:
        ok = ReflectionClient(deadline=2)
        deep = ReflectionClient(deadline=2, max_depth=5)
        wide = ReflectionClient(deadline=2, max_files=8)
        try:
            assert dict((await ok.fetch("deep.Deep", srv.address)).methods) == {"Go": None}
            with pytest.raises(MalformedDescriptors, match="deeper than 5"):
                await deep.fetch("deep.Deep", srv.address)
        finally:
            await ok.close()
            await deep.close()
    with reflection_server(files, ["deep.Deep"], include_dependencies=True) as srv:
        try:
            with pytest.raises(MalformedDescriptors, match="more than 8 files"):
                await wide.fetch("deep.Deep", srv.address)
        finally:
            await wide.close()


async def test_one_channel_per_endpoint_and_the_pool_is_bounded():
    from reflection_cache.client import ChannelPool

    with reflection_server(orders_files(), [ORDERS, ORDERS_ADMIN]) as a, \
            reflection_server(orders_files(), [ORDERS]) as b:
        client = ReflectionClient(deadline=2, channels=ChannelPool(max_channels=1))
        try:
            await client.fetch(ORDERS, a.address)
            first = client.channels.get(a.address)
            await client.fetch(ORDERS_ADMIN, a.address)
            assert client.channels.get(a.address) is first
            await client.fetch(ORDERS, b.address)
            assert len(client.channels) == 1
            await client.fetch(ORDERS, a.address)  # evicted channel: dialled again, still works
        finally:
            await client.close()


async def test_idle_channels_are_closed_and_dialled_again_when_needed():
    """A channel not used for idle_timeout is closed by itself (memory is not held for every
    endpoint between fetches); the next fetch dials afresh and works."""
    from reflection_cache.client import ChannelPool

    with reflection_server(orders_files(), [ORDERS]) as srv:
        client = ReflectionClient(deadline=2, channels=ChannelPool(idle_timeout=0.2))
        try:
            await client.fetch(ORDERS, srv.address)
            first = client.channels.get(srv.address)
            deadline = time.monotonic() + 10
            while len(client.channels) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(client.channels) == 0
            assert (await client.fetch(ORDERS, srv.address)).service == ORDERS
            assert client.channels.get(srv.address) is not first
        finally:
            await client.close()


async def test_a_channel_in_use_is_not_closed_for_idleness():
    """A call slower than idle_timeout keeps its channel (a lease) and completes."""
    from reflection_cache.client import ChannelPool

    with reflection_server(orders_files(), [ORDERS], delay=0.6) as srv:
        client = ReflectionClient(deadline=10, channels=ChannelPool(idle_timeout=0.1))
        try:
            assert (await client.fetch(ORDERS, srv.address)).service == ORDERS
        finally:
            await client.close()


@pytest.mark.parametrize("bad", [0, -1.0])
def test_channel_idle_timeout_must_be_positive(bad):
    from reflection_cache.client import ChannelPool

    with pytest.raises(ValueError, match="idle_timeout must be positive"):
        ChannelPool(idle_timeout=bad)


async def test_recovers_as_soon_as_a_stopped_reflection_server_is_back(client, port):
    files = orders_files()
    with reflection_server(files, [ORDERS], port=port) as srv:
        await client.fetch(ORDERS, srv.address)
    with pytest.raises(ReflectionUnavailable, match="UNAVAILABLE"):
        await client.fetch(ORDERS, f"127.0.0.1:{port}")
    with reflection_server(files, [ORDERS], port=port) as again:
        assert (await client.fetch(ORDERS, again.address)).service == ORDERS


async def test_fetched_modes_are_read_only(client):
    with reflection_server(orders_files(), [ORDERS]) as srv:
        modes = await client.fetch(ORDERS, srv.address)
    with pytest.raises(TypeError):
        modes.methods["GetOrder"] = Mode.ENGINEERS_WITHOUT_APPROVAL  # type: ignore[index]


@pytest.mark.parametrize("value,expect", [(9, E.BREAK_GLASS_ONLY), (0, None)], ids=["newer-enum", "unspecified"])
async def test_unknown_option_value_never_widens_access(client, value, expect):
    from rpcauthz.v1 import options_pb2

    def rewrite(blob: bytes) -> bytes:
        fdp = descriptor_pb2.FileDescriptorProto.FromString(blob)
        for svc in fdp.service:
            for m in svc.method:
                if m.name == "GetOrder":
                    m.options.Extensions[options_pb2.humans_who_can_rpc] = value
        return fdp.SerializeToString()

    with reflection_server(orders_files(), [ORDERS], rewrite=rewrite) as srv:
        modes = await client.fetch(ORDERS, srv.address)
    if expect is None:  # explicitly UNSPECIFIED: the service default applies
        assert modes.mode_for("GetOrder", E.BREAK_GLASS_ONLY) == (E.CONTRIBUTORS_WITHOUT_APPROVAL, "service")
    else:
        assert modes.methods["GetOrder"] is expect


def test_mode_for_answers_as_resolve_mode_does():
    """ServiceModes reads the options once, when made; every answer (mode and source) must be
    what resolving them per call gives, for every combination and default."""
    values = [None, *E]
    for service_default in values:
        modes = ServiceModes("a.v1.S", {f"m{i}": v for i, v in enumerate(values)}, service_default)
        for default in [m for m in E if m is not E.UNSPECIFIED]:
            for i, v in enumerate(values):
                assert modes.mode_for(f"m{i}", default) == resolve_mode(v, service_default, default)
        with pytest.raises(UnknownMethod, match="a.v1.S has no method 'Nope'"):
            modes.mode_for("Nope", E.BREAK_GLASS_ONLY)
        if modes.mode_for("m0", E.BREAK_GLASS_ONLY)[1] == "default":
            with pytest.raises(ValueError, match="cannot be UNSPECIFIED"):
                modes.mode_for("m0", E.UNSPECIFIED)


async def test_an_unchanged_answer_is_not_read_again(client, monkeypatch):
    """grpcio-reflection's own servicer answers twice with the same bytes: the second fetch
    returns the first's modes without building a descriptor pool (the cyclic garbage a cache
    refreshing thousands of services would otherwise leave every ttl)."""
    from reflection_cache import client as client_module

    built = []
    real_build_pool = client_module.build_pool
    monkeypatch.setattr(client_module, "build_pool", lambda files, where: built.append(where) or
                        real_build_pool(files, where))
    demo = start_demo_server(reflection=("v1alpha",))
    try:
        first = await client.fetch("rpcauthz.demo.v1.Accounts", demo.address)
        again = await client.fetch("rpcauthz.demo.v1.Accounts", demo.address)
        ledger = await client.fetch("rpcauthz.demo.v1.Ledger", demo.address)  # same files, another service
    finally:
        demo.stop(grace=0)
    assert again is first and client.unchanged == 1
    assert len(built) == 2, built
    assert ledger.service_default is E.CONTRIBUTORS_WITH_APPROVAL


async def test_a_changed_answer_is_read_again(client):
    """The same service at the same endpoint, its option changed between two answers (one
    byte of one file): the second fetch reads the new mode, whatever it read before."""
    from rpcauthz.v1 import options_pb2

    value = {"GetOrder": E.ENGINEERS_WITHOUT_APPROVAL}

    def rewrite(blob: bytes) -> bytes:
        fdp = descriptor_pb2.FileDescriptorProto.FromString(blob)
        for svc in fdp.service:
            for m in svc.method:
                if m.name in value:
                    m.options.Extensions[options_pb2.humans_who_can_rpc] = value[m.name]
        return fdp.SerializeToString()

    with reflection_server(orders_files(), [ORDERS], rewrite=rewrite) as srv:
        before = await client.fetch(ORDERS, srv.address)
        value["GetOrder"] = E.BREAK_GLASS_ONLY
        after = await client.fetch(ORDERS, srv.address)
        value["GetOrder"] = E.ENGINEERS_WITHOUT_APPROVAL
        back = await client.fetch(ORDERS, srv.address)
    assert before.methods["GetOrder"] is E.ENGINEERS_WITHOUT_APPROVAL
    assert after.methods["GetOrder"] is E.BREAK_GLASS_ONLY
    assert back.methods["GetOrder"] is E.ENGINEERS_WITHOUT_APPROVAL
    assert client.unchanged == 0


@pytest.mark.parametrize("versions", [("v1alpha",), ("v1",)])
async def test_list_services_names_what_the_endpoint_serves(client, versions):
    """``list_services`` through each version (v1alpha is grpcio-reflection's own servicer):
    the endpoint's services as it lists them, its reflection and health services included."""
    demo = start_demo_server(reflection=versions)
    try:
        names = await client.list_services(demo.address)
    finally:
        demo.stop(grace=0)
    assert {"rpcauthz.demo.v1.Accounts", "rpcauthz.demo.v1.Ledger", "grpc.health.v1.Health",
            f"grpc.reflection.{versions[0]}.ServerReflection"} <= set(names)
    assert client.protocol_of[demo.address] == versions[0]


async def test_list_services_of_an_endpoint_that_cannot_list_them_says_why(client, port):
    demo = start_demo_server(reflection=())
    try:
        with pytest.raises(ReflectionUnavailable, match="neither grpc.reflection.v1 nor v1alpha"):
            await client.list_services(demo.address)
    finally:
        demo.stop(grace=0)
    with pytest.raises(ReflectionUnavailable, match=f"127.0.0.1:{port}"):
        await client.list_services(f"127.0.0.1:{port}")
