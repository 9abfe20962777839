from rpcauthz.v1 import options_pb2 as _options_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class AccountRequest(_message.Message):
    __slots__ = ("account_id", "note", "customer_email")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_EMAIL_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    note: str
    customer_email: str
    def __init__(self, account_id: _Optional[str] = ..., note: _Optional[str] = ..., customer_email: _Optional[str] = ...) -> None: ...

class AccountReply(_message.Message):
    __slots__ = ("account_id", "message")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    message: str
    def __init__(self, account_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
