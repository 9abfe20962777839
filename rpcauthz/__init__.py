"""Shared plumbing every component may use, and nothing else: the code generated from the
project's protos (``rpcauthz.v1`` is the ``humans_who_can_rpc`` option), Slack's durable
outbox. It imports no other package of this project."""
