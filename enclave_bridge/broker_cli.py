"""``mpactl broker ...``: run the credential broker and manage its trusted measurement.

``register(app)`` adds a ``broker`` command group:

* ``mpactl broker measure``  build the broker artifact twice from a commit; print its SHA-384
* ``mpactl broker trust propose|check|accept|show``  two-person changes of the trusted measurement,
  approved in the approvals service and verified from its signed receipt
* ``mpactl broker serve``  run the broker (inside the enclave, or simulated locally)
* ``mpactl broker audit verify|export``  check the chained, signed audit log; export it to the store

Exit codes are README.md's table ("Exit codes"): ``trust check``/``trust accept`` and ``audit
verify``/``audit export`` exit 6 (not verified) when a build, a receipt or the audit chain does not
verify.
"""
from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import typer

from rpcauthz.console import ExitCode, JsonOption, fail, print_json
from rpcauthz.server_start import load_or_exit

from . import measure as measure_mod

DEFAULT_LEDGER = Path("measurements.json")


def _approvals_session(server: str | None) -> tuple[str, str]:
    """The approvals server URL and the signed-in engineer's token (MPA_TOKEN or `mpa login`'s session)."""
    import os
    session: dict = {}
    path = Path(os.environ.get("MPA_CONFIG_DIR") or Path.home() / ".config" / "mpa") / "session.json"
    try:
        session = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    url = (server or os.environ.get("MPA_SERVER") or session.get("server") or "").rstrip("/")
    token = (os.environ.get("MPA_TOKEN") or session.get("token") or "").strip()
    if not url:
        fail("no approvals server known: pass --server URL, set MPA_SERVER or run `mpa login`", ExitCode.USAGE)
    if not token:
        fail("not signed in: run `mpa login` (or set MPA_TOKEN)", ExitCode.NOT_SIGNED_IN)
    return url, token


def _approvals_call(method: str, url: str, token: str, **kwargs) -> dict:
    import httpx
    try:
        resp = httpx.request(method, url, headers={"Authorization": f"Bearer {token}"}, timeout=15, **kwargs)
    except httpx.HTTPError as e:
        fail(f"cannot reach the approvals server: {e}", ExitCode.UNREACHABLE)
    try:
        data = resp.json()
    except ValueError:
        data = {}
    if resp.status_code >= 400:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        fail(f"approvals server refused ({resp.status_code} {err.get('code', '')}): "
             f"{err.get('message', resp.text[:200])}",
             ExitCode.NOT_SIGNED_IN if resp.status_code == 401 else
             ExitCode.UNREACHABLE if resp.status_code >= 500 else ExitCode.FAILURE)
    return data


def register(app: typer.Typer) -> None:
    broker = typer.Typer(help="Run the enclave credential broker and manage its trusted measurement.",
                         no_args_is_help=True)
    app.add_typer(broker, name="broker")
    trust = typer.Typer(help="Change the trusted measurement: an MPA request another security on-call approves.",
                        no_args_is_help=True)
    broker.add_typer(trust, name="trust")

    @broker.command("measure")
    def measure(repo: Path = typer.Option(Path("."), "--repo", help="the git repository to build from"),
                rev: str = typer.Option("HEAD", "--rev", help="commit, tag or branch to build"),
                out: Path | None = typer.Option(None, "--out", help="also write the artifact here"),
                as_json: bool = JsonOption("print JSON: {commit, sha384, size}")) -> None:
        """Build the broker artifact twice from REV and print its SHA-384 (fails if the builds differ)."""
        try:
            m = measure_mod.measure(repo, rev, out=out)
        except measure_mod.BuildError as e:
            fail(str(e))
        if as_json:
            print_json({"commit": m.commit, "sha384": m.sha384, "size": m.size})
        else:
            typer.echo(f"commit  {m.commit}\nsha384  {m.sha384}\nsize    {m.size} bytes (built twice, identical)")

    @trust.command("propose")
    def propose(commit: str = typer.Option(..., "--commit", help="commit to trust (resolved in --repo)"),
                reason: str = typer.Option(..., "--reason", help="why this version"),
                incident: str = typer.Option(..., "--incident", help="change ticket or incident reference"),
                repo: Path = typer.Option(Path("."), "--repo", help="the git repository to build from"),
                server: str | None = typer.Option(None, "--server", help="approvals server URL "
                                                  "(default: MPA_SERVER or the `mpa login` session)")) -> None:
        """Build COMMIT and ask the approvals service to trust its measurement (you: security on-call).

        You sign in as for any approval (`mpa login`); another security on-call engineer approves
        with `mpa approve` or the page, after building the commit themselves (`mpactl broker measure`).
        """
        from .trust import TRUST_METHOD, TRUST_SERVICE, change_digest
        try:
            full = measure_mod.resolve_commit(repo, commit)
            m = measure_mod.measure(repo, full)
        except measure_mod.BuildError as e:
            fail(str(e))
        url, token = _approvals_session(server)
        body = {"service": TRUST_SERVICE, "method": TRUST_METHOD, "incident": incident,
                "reason": f"{reason} (trust broker build of commit {m.commit}, sha384 {m.sha384})",
                "body_sha256": change_digest(m.commit, m.sha384)}
        r = _approvals_call("POST", f"{url}/api/v1/requests", token, json=body)
        typer.echo(f"{r['id']}  proposes trusting commit {m.commit}\n        sha384 {m.sha384}\n"
                   f"        {r.get('link', '')}\n"
                   f"Another security on-call engineer builds and checks it, then approves:\n"
                   f"  mpactl broker trust check {r['id']} --commit {m.commit} && mpa approve {r['id']}\n"
                   f"Then: mpactl broker trust accept {r['id']} --commit {m.commit} --config BROKER_YAML "
                   "--approvals-key RECEIPT_PUBLIC_KEY")

    @trust.command("check")
    def check(request_id: str = typer.Argument(..., help="the trust request you are asked to approve"),
              commit: str = typer.Option(..., "--commit", help="the commit the request names"),
              repo: Path = typer.Option(Path("."), "--repo", help="your own clone to build from"),
              server: str | None = typer.Option(None, "--server", help="approvals server URL")) -> None:
        """Before approving: build COMMIT yourself and check the request is bound to exactly that build."""
        from .trust import TRUST_METHOD, TRUST_SERVICE, change_digest
        try:
            m = measure_mod.measure(repo, measure_mod.resolve_commit(repo, commit))
        except measure_mod.BuildError as e:
            fail(str(e))
        url, token = _approvals_session(server)
        r = _approvals_call("GET", f"{url}/api/v1/requests/{request_id}", token)
        if (r.get("service"), r.get("method")) != (TRUST_SERVICE, TRUST_METHOD):
            fail(f"{request_id} is not a trust change (/{r.get('service')}/{r.get('method')})", ExitCode.USAGE)
        if r.get("body_sha256") != change_digest(m.commit, m.sha384):
            fail(f"MISMATCH: your build of {m.commit} is sha384 {m.sha384}, and {request_id} is not bound "
                 "to it: do not approve; find out why", ExitCode.NOT_VERIFIED)
        typer.echo(f"ok: {request_id} is bound to your build of {m.commit} (sha384 {m.sha384}); "
                   f"approve with: mpa approve {request_id}")

    @trust.command("accept")
    def accept(request_id: str = typer.Argument(..., help="the approved trust request"),
               commit: str = typer.Option(..., "--commit", help="the commit the request is for"),
               config: Path = typer.Option(..., "--config", help="the broker YAML (its grants decide who is on-call)"),
               approvals_key: Path = typer.Option(..., "--approvals-key",
                                                  help="the approvals service's receipt public key (PEM), pinned"),
               repo: Path = typer.Option(Path("."), "--repo", help="your own clone to build from"),
               ledger: Path = typer.Option(DEFAULT_LEDGER, "--ledger", help="the trust ledger file"),
               server: str | None = typer.Option(None, "--server", help="approvals server URL")) -> None:
        """Fetch the approval's signed receipt, verify it as the broker will, and make it the trusted build."""
        from .broker.config import BrokerConfig, ConfigError
        from .trust import TrustChangeRefused, load_public_key, verify_trust_receipt
        try:
            cfg = BrokerConfig.from_file(config)
            key = load_public_key(approvals_key.read_bytes())
            full = measure_mod.resolve_commit(repo, commit)
            m = measure_mod.measure(repo, full)
        except (ConfigError, ValueError, OSError, measure_mod.BuildError) as e:
            fail(str(e))
        url, token = _approvals_session(server)
        got = _approvals_call("GET", f"{url}/api/v1/requests/{request_id}/receipt", token)
        try:
            ok = verify_trust_receipt(got["receipt"], public_key=key, grants=cfg.grant_set(), commit=m.commit,
                                      sha384=m.sha384, now=datetime.now(UTC))
        except TrustChangeRefused as e:
            fail(f"refused: {e}", ExitCode.NOT_VERIFIED)
        measure_mod.TrustLedger(ledger).accept({
            "commit": m.commit, "sha384": m.sha384, "request_id": ok.request_id, "receipt": got["receipt"],
            "requester": ok.requester, "approvers": list(ok.approvers),
            "approved_at": ok.approved_at.isoformat(), "accepted_at": datetime.now(UTC).isoformat()})
        typer.echo(f"trusted: sha384 {m.sha384} (commit {m.commit}), proposed by {ok.requester}, "
                   f"approved by {', '.join(ok.approvers)} ({ok.request_id})")

    @trust.command("show")
    def show(ledger: Path = typer.Option(DEFAULT_LEDGER, "--ledger", help="the trust ledger file"),
             as_json: bool = JsonOption("print the trusted measurement as JSON (null when there is none)")) -> None:
        """Print the trusted measurement in force (as JSON; "no trusted measurement yet" without one)."""
        t = measure_mod.TrustLedger(ledger).trusted()
        shown = {k: v for k, v in t.items() if k != "receipt"} if t else None
        if as_json:
            print_json(shown)
        elif shown is None:
            typer.echo("no trusted measurement yet")
        else:
            typer.echo(json.dumps(shown, indent=1))

    audit = typer.Typer(help="The broker's chained, signed audit log: verify it, export it to the store.",
                        no_args_is_help=True)
    broker.add_typer(audit, name="audit")

    @audit.command("verify")
    def audit_verify(audit_log: Path = typer.Option(..., "--audit-log", help="the broker's JSON-lines audit log"),
                     public_key: Path | None = typer.Option(None, "--public-key",
                                                            help="the broker audit key (default: AUDIT_LOG.pub; "
                                                            "pin a copy kept off the host)"),
                     store: str | None = typer.Option(None, "--store", help="store URL whose exported audit is "
                                                      "the witness for truncation and rollback")) -> None:
        """Check every record's signature and chain; with --store, that nothing exported is missing or rewritten."""
        from .broker.audit_chain import AuditChainError, load_public_key, store_witness, verify_file
        witness = None
        try:
            key = load_public_key((public_key or audit_log.with_name(audit_log.name + ".pub")).read_bytes())
            if store:
                from policy.stores import open_store
                st = open_store(store)
                try:
                    witness = store_witness(st)
                finally:
                    st.close()
            head = verify_file(audit_log, key, witness=witness)
        except AuditChainError as e:
            fail(f"{type(e).__name__}: {e}", ExitCode.NOT_VERIFIED)
        except (OSError, ValueError) as e:
            fail(str(e))
        typer.echo(f"ok: {head.seq} records, head {head.hash}"
                   + (f"; store witness seq {witness.seq} matches" if witness else ""))

    @audit.command("export")
    def audit_export(audit_log: Path = typer.Option(..., "--audit-log", help="the broker's JSON-lines audit log"),
                     public_key: Path | None = typer.Option(None, "--public-key",
                                                            help="the broker audit key (default: AUDIT_LOG.pub)"),
                     store: str = typer.Option(..., "--store", help="store URL (the approvals/gateway store)")) -> None:
        """Verify the log against the store's witness, then append the records the store's audit lacks."""
        from policy.stores import open_store

        from .broker.audit_chain import AuditChainError, export_to_store, load_public_key
        try:
            key = load_public_key((public_key or audit_log.with_name(audit_log.name + ".pub")).read_bytes())
            st = open_store(store)
            try:
                head, n = export_to_store(audit_log, key, st)
            finally:
                st.close()
        except AuditChainError as e:
            fail(f"{type(e).__name__}: {e}", ExitCode.NOT_VERIFIED)
        except (OSError, ValueError) as e:
            fail(str(e))
        typer.echo(f"exported {n} records; head seq {head.seq}")

    @broker.command("seal-seeds")
    def seal_seeds(key_id: str = typer.Option(..., "--kms-key-id", help="KMS key (id, ARN or alias) whose "
                                              "policy pins the broker's measurement"),
                   out: Path = typer.Option(..., "--out", help="where to write the sealed seed bundle"),
                   kms_region: str = typer.Option("eu-west-2", "--kms-region", help="AWS region of the KMS key"),
                   kms_endpoint: str | None = typer.Option(None, "--kms-endpoint",
                                                           help="KMS endpoint URL (default: AWS's for the region)"),
                   slack_webhook_url: str | None = typer.Option(
                       None, "--slack-webhook-url", envvar="MPA_BROKER_SLACK_WEBHOOK",
                       help="Slack incoming webhook for notifications (env MPA_BROKER_SLACK_WEBHOOK)"),
                   with_aws_keys: bool = typer.Option(
                       False, "--with-aws-keys", help="include AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the "
                       "environment as the broker's STS credentials")) -> None:
        """Make fresh seed secrets and seal them under a KMS key (run once, on a trusted machine).

        Prints the Kubernetes issuer's public JWKS; the private key exists only inside the bundle.
        """
        import os

        import boto3

        from .credentials.k8s import OidcIssuer
        from .kms import KmsError, boto3_encrypter
        from .seeds import SeedBundle, seal_bundle

        if out.exists():
            fail(f"{out} exists; refusing to overwrite seed secrets (move it away first)")
        aws = None
        if with_aws_keys:
            kid, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
            if not kid or not secret:
                fail("--with-aws-keys needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment",
                     ExitCode.USAGE)
            aws = {"access_key_id": kid, "secret_access_key": secret}
        bundle = SeedBundle.generate(aws=aws, slack_webhook_url=slack_webhook_url)
        client = boto3.client("kms", region_name=kms_region, endpoint_url=kms_endpoint)
        try:
            sealed = seal_bundle(bundle, key_id, boto3_encrypter(client, key_id))
        except KmsError as e:
            fail(str(e))
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(sealed)
        jwks = OidcIssuer("https://unused.invalid", bundle.signing_key()).jwks()
        typer.echo(json.dumps({"sealed": str(out), "kubernetes_jwks": jwks}, indent=1))

    @broker.command("serve")
    def serve(config: Path = typer.Option(..., "--config", help="broker YAML config"),
              state: Path = typer.Option(..., "--state", help="sealed state file on the host (SQLite)"),
              audit_log: Path = typer.Option(..., "--audit-log", help="JSON-lines audit log on the host"),
              slack_spool: Path | None = typer.Option(
                  None, "--slack-spool", help="SQLite spool for Slack messages waiting to be delivered "
                  "(default: next to --state, as STATE.slack.db); used when the seeds hold a webhook"),
              listen: str = typer.Option("127.0.0.1:8443", "--listen", help="host:port for the TLS gRPC API"),
              listen_port: int | None = typer.Option(None, "--port", min=0, max=65535,
                                                     help="Override the port of --listen (as for the other servers)."),
              oidc_listen: str = typer.Option("", "--oidc-listen",
                                              help="host:port to serve the Kubernetes issuer's discovery + JWKS"),
              cert_out: Path = typer.Option(Path("broker.pem"), "--cert-out",
                                            help="where to write the broker's certificate (clients pin it)"),
              seeds: Path | None = typer.Option(None, "--seeds", help="sealed seed bundle (production)"),
              kms_region: str = typer.Option("eu-west-2", "--kms-region", help="AWS region of the KMS key"),
              kms_endpoint: str | None = typer.Option(None, "--kms-endpoint",
                                                         help="KMS endpoint URL (through the egress proxy)"),
              nsm_device: str = typer.Option("/dev/nsm", "--nsm", help="the Nitro Security Module device"),
              simulate: Path | None = typer.Option(
                  None, "--simulate", help="DEMO ONLY: simulated NSM and a local KMS kept in this folder"),
              ledger: Path | None = typer.Option(None, "--ledger",
                                                    help="with --simulate: pin the ledger's trusted measurement"),
              approvals_key: Path | None = typer.Option(
                  None, "--approvals-key", help="with --ledger: the approvals service's receipt public key "
                  "(PEM); the ledger's change is re-verified with it and this config's grants"),
              repo: Path = typer.Option(Path("."), "--repo", help="with --simulate: what the enclave 'runs'")) -> None:
        """Run the broker: open seeds through KMS with an attestation document, then serve.

        In an enclave: --seeds FILE (and the real /dev/nsm and KMS). Locally: --simulate DIR, which
        measures --repo's HEAD as the simulated image (PCR0) and makes a local KMS whose key
        policy pins the --ledger's trusted measurement (or, without a ledger, this build).
        """
        import signal
        import threading

        import boto3
        from botocore.config import Config

        aws_config = Config(connect_timeout=5, read_timeout=15, retries={"max_attempts": 3, "mode": "standard"})

        from .broker.config import BrokerConfig, ConfigError
        from .broker.notify import BrokerSlack
        from .broker.server import start_broker
        from .kms import Boto3KmsClient, KmsError
        from .seeds import SeedError, open_bundle

        cfg = load_or_exit(lambda: BrokerConfig.from_file(config), errors=(ConfigError,))
        try:
            if simulate is not None:
                verified = None
                if ledger is not None:
                    if approvals_key is None:
                        fail("--ledger needs --approvals-key: the broker verifies the trust change itself",
                             ExitCode.USAGE)
                    verified = _verified_trusted(ledger, approvals_key, cfg)
                bundle, attester = _simulated_seeds(simulate, repo, verified)
            else:
                if seeds is None:
                    fail("--seeds is required (or --simulate DIR for a local demo)", ExitCode.USAGE)
                from .nsm import NsmDevice
                attester = NsmDevice(nsm_device)
                kms = Boto3KmsClient(boto3.client("kms", region_name=kms_region, endpoint_url=kms_endpoint,
                                                  config=aws_config))
                bundle = open_bundle(seeds.read_bytes(), kms, attester)
        except (SeedError, KmsError, OSError, measure_mod.BuildError) as e:
            fail(f"seed secrets were not released, refusing to start: {e}")
        sts_kwargs = {}
        if bundle.aws:
            sts_kwargs = {"aws_access_key_id": bundle.aws.get("access_key_id"),
                          "aws_secret_access_key": bundle.aws.get("secret_access_key")}
        sts = boto3.client("sts", region_name=cfg.aws_region, endpoint_url=cfg.sts_endpoint_url,
                           config=aws_config, **sts_kwargs) \
            if cfg.roles else None
        host, _, port = listen.rpartition(":")
        if listen_port is not None:
            port = str(listen_port)
        oidc = None
        if oidc_listen:
            oh, _, op = oidc_listen.rpartition(":")
            oidc = (oh, int(op))
        slack = None
        if bundle.slack_webhook_url:
            try:
                slack = BrokerSlack(bundle.slack_webhook_url,
                                    slack_spool or state.with_name(state.name + ".slack.db")).start()
            except ValueError as e:
                fail(f"the sealed seeds' Slack webhook is unusable: {e}")
        notifiers = [slack.notifier] if slack else []
        from .broker.audit_chain import AuditChainError, ChainedAuditLog, audit_key
        try:
            chained = ChainedAuditLog(audit_log, audit_key(bundle.state_key))
        except AuditChainError as e:
            fail(f"the audit log {audit_log} does not verify, refusing to start: {type(e).__name__}: {e}")
        try:
            runtime = start_broker(cfg, bundle, state_path=state, audit=[chained], sts_client=sts,
                                   notifiers=notifiers, host=host, port=int(port), oidc_listen=oidc, cert_out=cert_out,
                                   attester=attester)
        except AuditChainError as e:
            fail(f"the audit log {audit_log} is behind the broker's sealed head, refusing to start: "
                  f"{type(e).__name__}: {e}")
        typer.echo(f"broker listening on {host}:{runtime.port} as {cfg.server_name}; certificate "
                   f"{runtime.tls.fingerprint} written to {cert_out}", err=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait()
        runtime.close()
        if slack:
            slack.close()


def _verified_trusted(ledger: Path, approvals_key: Path, cfg) -> str:
    """The ledger's trusted SHA-384, only if its receipt verifies (pinned key, this config's grants)."""
    from .trust import TrustChangeRefused, load_public_key, verify_trust_receipt
    trusted = measure_mod.TrustLedger(ledger).trusted()
    if not trusted:
        raise measure_mod.BuildError(f"the ledger {ledger} has no trusted measurement yet")
    try:
        key = load_public_key(approvals_key.read_bytes())
        verify_trust_receipt(str(trusted.get("receipt", "")), public_key=key, grants=cfg.grant_set(),
                             commit=str(trusted.get("commit", "")), sha384=str(trusted.get("sha384", "")))
    except (TrustChangeRefused, ValueError) as e:
        raise measure_mod.BuildError(f"the ledger's trusted measurement is not a verified two-person "
                                     f"change: {e}") from None
    return str(trusted["sha384"])


def _simulated_seeds(folder: Path, repo: Path, trusted_sha384: str | None):
    """DEMO ONLY: what the enclave, NSM and KMS do, in one process, persisted in ``folder``.

    The simulated image measurement is the SHA-384 of this checkout's broker artifact; the local
    KMS key policy pins the verified trusted measurement from the ledger. Run code that two people did
    not agree on and KMS refuses, exactly as it would in production.
    """
    import os

    from cryptography.hazmat.primitives.serialization import Encoding

    from .kms import KeyPolicy, LocalKms, attestation_verifier
    from .nsm import SimulatedNsm, default_simulated_pcrs
    from .seeds import SeedBundle, open_bundle, seal_bundle

    folder.mkdir(parents=True, exist_ok=True)
    running = measure_mod.measure(repo, "HEAD")
    pcrs = default_simulated_pcrs()
    pcrs[0] = bytes.fromhex(running.sha384)
    nsm = SimulatedNsm(pcrs=pcrs)
    kms = LocalKms(attestation_verifier(nsm.root_certificate))
    keys_file, seeds_file = folder / "local-kms.json", folder / "seeds.json"
    if trusted_sha384 is not None:
        pinned = bytes.fromhex(trusted_sha384)
    else:
        pinned = pcrs[0]
    # As the runbook's key policy: the whole image (PCR0 the trusted build, PCR1/PCR2 the simulated
    # kernel and application) is pinned.
    policy = KeyPolicy.for_pcrs({0: pinned, 1: pcrs[1], 2: pcrs[2]})
    if keys_file.exists():
        kms.import_keys(json.loads(keys_file.read_text()))
        key_id = next(iter(json.loads(keys_file.read_text())))
        kms.put_key_policy(key_id, policy)
    else:
        key_id = kms.create_key(policy, key_id="local-broker-seeds")
    if not seeds_file.exists():
        # As `seal-seeds --slack-webhook-url` would: the demo's seeds carry MPA_BROKER_SLACK_WEBHOOK.
        webhook = os.environ.get("MPA_BROKER_SLACK_WEBHOOK") or None
        # As `seal-seeds --with-aws-keys` would: the broker's own STS key (e.g. the local AWS
        # stand-in's mpa-broker user) from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when both are set.
        kid, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        aws = {"access_key_id": kid, "secret_access_key": secret} if kid and secret else None
        seeds_file.write_bytes(seal_bundle(SeedBundle.generate(aws=aws, slack_webhook_url=webhook), key_id,
                                           lambda pt, ctx: kms.encrypt(key_id, pt, ctx)))
    keys_file.write_text(json.dumps(kms.export_keys()))
    keys_file.chmod(0o600)
    # The simulated NSM's root, for clients that check the broker certificate's attestation.
    (folder / "simulated-root.pem").write_bytes(nsm.root_certificate.public_bytes(Encoding.PEM))
    return open_bundle(seeds_file.read_bytes(), kms, nsm), nsm


def main() -> None:
    app = typer.Typer(name="mpactl", no_args_is_help=True, add_completion=False)
    register(app)
    app()


if __name__ == "__main__":
    main()
