from rpcauthz.v1 import options_pb2 as _options_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EntryRequest(_message.Message):
    __slots__ = ("ledger_id", "amount_minor_units", "memo")
    LEDGER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_UNITS_FIELD_NUMBER: _ClassVar[int]
    MEMO_FIELD_NUMBER: _ClassVar[int]
    ledger_id: str
    amount_minor_units: int
    memo: str
    def __init__(self, ledger_id: _Optional[str] = ..., amount_minor_units: _Optional[int] = ..., memo: _Optional[str] = ...) -> None: ...

class EntryReply(_message.Message):
    __slots__ = ("ledger_id", "message")
    LEDGER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ledger_id: str
    message: str
    def __init__(self, ledger_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
