"""What approvers read of a bound call: redacted at any depth, size-capped."""
from __future__ import annotations


def test_redaction_reaches_nested_and_repeated_messages():
    """``[debug_redact = true]`` is honoured at any depth (a descriptor built here, as
    reflection would return it)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    from mpa.body_types import body_view

    fd = descriptor_pb2.FileDescriptorProto(name="t.proto", package="t", syntax="proto3")
    inner = fd.message_type.add(name="Inner")
    f = inner.field.add(name="secret", number=1, type=9, label=1)
    f.options.debug_redact = True
    inner.field.add(name="plain", number=2, type=9, label=1)
    outer = fd.message_type.add(name="Outer")
    outer.field.add(name="one", number=1, type=11, label=1, type_name=".t.Inner")
    outer.field.add(name="many", number=2, type=11, label=3, type_name=".t.Inner")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    outer_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Outer"))
    msg = outer_cls()
    msg.one.secret, msg.one.plain = "s1", "p1"
    for s in ("s2", "s3"):
        item = msg.many.add()
        item.secret, item.plain = s, "p"
    view = body_view(msg)
    assert "s1" not in view and "s2" not in view and "s3" not in view
    assert view.count("[REDACTED]") == 3 and '"plain": "p1"' in view
    assert len(body_view(msg, cap=20)) < 120 and "cut:" in body_view(msg, cap=20)
