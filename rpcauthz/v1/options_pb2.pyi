from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class HumansWhoCanRpc(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HUMANS_WHO_CAN_RPC_UNSPECIFIED: _ClassVar[HumansWhoCanRpc]
    ENGINEERS_WITHOUT_APPROVAL: _ClassVar[HumansWhoCanRpc]
    ENGINEERS_WITH_APPROVAL: _ClassVar[HumansWhoCanRpc]
    CONTRIBUTORS_WITHOUT_APPROVAL: _ClassVar[HumansWhoCanRpc]
    CONTRIBUTORS_WITH_APPROVAL: _ClassVar[HumansWhoCanRpc]
    BREAK_GLASS_ONLY: _ClassVar[HumansWhoCanRpc]
HUMANS_WHO_CAN_RPC_UNSPECIFIED: HumansWhoCanRpc
ENGINEERS_WITHOUT_APPROVAL: HumansWhoCanRpc
ENGINEERS_WITH_APPROVAL: HumansWhoCanRpc
CONTRIBUTORS_WITHOUT_APPROVAL: HumansWhoCanRpc
CONTRIBUTORS_WITH_APPROVAL: HumansWhoCanRpc
BREAK_GLASS_ONLY: HumansWhoCanRpc
HUMANS_WHO_CAN_RPC_FIELD_NUMBER: _ClassVar[int]
humans_who_can_rpc: _descriptor.FieldDescriptor
DEFAULT_HUMANS_WHO_CAN_RPC_FIELD_NUMBER: _ClassVar[int]
default_humans_who_can_rpc: _descriptor.FieldDescriptor
