"""EndpointResolver: static map, package prefixes, host template, default, refusals."""
from __future__ import annotations

import pytest

from reflection_cache import UnknownService
from reflection_cache.endpoints import PLACEHOLDERS, EndpointResolver, placeholders


def test_exact_name_beats_longest_package_prefix_beats_template():
    r = EndpointResolver(
        static={"shop.orders.v1.Orders": "orders-special:1", "shop": "shop:2", "shop.orders": "orders:3"},
        template="{name_lower}.internal:50051", default="fallback:4")
    assert r.resolve("shop.orders.v1.Orders") == "orders-special:1"
    assert r.resolve("shop.orders.v1.OrdersAdmin") == "orders:3"
    assert r.resolve("shop.carts.v1.Carts") == "shop:2"
    assert r.resolve("shopping.v1.Basket") == "basket.internal:50051"  # "shop" matches whole segments only


def test_template_placeholders():
    assert placeholders("rpcauthz.demo.v1.Ledger") == {
        "service": "rpcauthz.demo.v1.Ledger", "service_lower": "rpcauthz.demo.v1.ledger",
        "service_dashed": "rpcauthz-demo-v1-ledger", "package": "rpcauthz.demo.v1",
        "package_dashed": "rpcauthz-demo-v1", "name": "Ledger", "name_lower": "ledger"}
    assert set(PLACEHOLDERS) == set(placeholders("a.B"))
    r = EndpointResolver(template="{name_lower}.{package_dashed}.svc.cluster.local:50051")
    assert r.resolve("my_co.pay.v2.Refunds") == "refunds.my-co-pay-v2.svc.cluster.local:50051"
    assert EndpointResolver(template="{service}.internal:50051").resolve("a.v1.S") == "a.v1.S.internal:50051"


def test_default_then_unknown():
    assert EndpointResolver(default="127.0.0.1:9").resolve("x.v1.Y") == "127.0.0.1:9"
    with pytest.raises(UnknownService, match="no reflection endpoint is configured for service x.v1.Y"):
        EndpointResolver(static={"z": "z:1"}).resolve("x.v1.Y")


@pytest.mark.parametrize("name", ["", "Orders", "/shop.v1.Orders/Get", "shop..Orders", "shop.v1.Orders ",
                                  "shop.v1.Or%64ers", "shop.v1.1Orders", "a" * 10 + ".b/c"])
def test_names_that_are_not_service_names_are_unknown(name):
    with pytest.raises(UnknownService, match="not a fully-qualified gRPC service name"):
        EndpointResolver(default="h:1").resolve(name)


def test_bad_configuration_is_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown or bad placeholder 'host'.*\{name_lower\}"):
        EndpointResolver(template="{host}:50051")
    with pytest.raises(ValueError, match="template '{name}': 'Sample' is not host:port"):
        EndpointResolver(template="{name}")
    with pytest.raises(ValueError, match="entry 'shop'.*'shop' is not host:port"):
        EndpointResolver(static={"shop": "shop"})
    with pytest.raises(ValueError, match="'shop/v1' is not a service or package name"):
        EndpointResolver(static={"shop/v1": "h:1"})
    with pytest.raises(ValueError, match="default reflection endpoint: 'nope' is not host:port"):
        EndpointResolver(default="nope")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['templates'\]"):
        EndpointResolver.from_config({"templates": "x:1"})


def test_from_config():
    r = EndpointResolver.from_config({"static": {"shop": "[::1]:50051"}, "template": "{name_lower}:1"})
    assert r.resolve("shop.v1.Cart") == "[::1]:50051"
    assert r.resolve("pay.v1.Pay") == "pay:1"
