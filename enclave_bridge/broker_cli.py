"""``mpactl broker ...``: run the credential broker and manage its trusted measurement.

``register(app)`` adds a ``broker`` command group:

* ``mpactl broker measure``  build the broker artifact twice from a commit; print its SHA-384
* ``mpactl broker trust propose|report|show``  the two-approver rule for the trusted measurement
* ``mpactl broker serve``  run the broker (inside the enclave, or simulated locally)
"""
from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import typer

from . import measure as measure_mod

DEFAULT_LEDGER = Path("measurements.json")


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"mpactl broker: {message}", err=True)
    raise typer.Exit(code)


def _approvers(value: str) -> frozenset[str]:
    path = Path(value)
    names = path.read_text().split() if path.exists() else value.split(",")
    found = frozenset(n.strip() for n in names if n.strip())
    if len(found) < 2:
        _fail("--approvers must name at least two measurement approvers (comma list or a file)")
    return found


def register(app: typer.Typer) -> None:
    broker = typer.Typer(help="Run the enclave credential broker and manage its trusted measurement.",
                         no_args_is_help=True)
    app.add_typer(broker, name="broker")
    trust = typer.Typer(help="Change the trusted measurement: two approvers must build the same hash.",
                        no_args_is_help=True)
    broker.add_typer(trust, name="trust")

    @broker.command("measure")
    def measure(repo: Path = typer.Option(Path("."), "--repo", help="the git repository to build from"),
                rev: str = typer.Option("HEAD", "--rev", help="commit, tag or branch to build"),
                out: Path | None = typer.Option(None, "--out", help="also write the artifact here"),
                as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
        """Build the broker artifact twice from REV and print its SHA-384 (fails if the builds differ)."""
        try:
            m = measure_mod.measure(repo, rev, out=out)
        except measure_mod.BuildError as e:
            _fail(str(e))
        if as_json:
            typer.echo(json.dumps({"commit": m.commit, "sha384": m.sha384, "size": m.size}))
        else:
            typer.echo(f"commit  {m.commit}\nsha384  {m.sha384}\nsize    {m.size} bytes (built twice, identical)")

    @trust.command("propose")
    def propose(commit: str = typer.Option(..., "--commit", help="commit to trust (resolved in --repo)"),
                reason: str = typer.Option(..., "--reason", help="why this version"),
                who: str = typer.Option(..., "--as", help="your engineer id"),
                repo: Path = typer.Option(Path("."), "--repo"),
                ledger: Path = typer.Option(DEFAULT_LEDGER, "--ledger", help="the measurement ledger file")) -> None:
        """Propose trusting the build of a commit; two approvers must then report matching hashes."""
        try:
            full = measure_mod.resolve_commit(repo, commit)
            p = measure_mod.MeasurementLedger(ledger).propose(commit=full, proposer=who, reason=reason,
                                                              now=datetime.now(UTC))
        except (measure_mod.BuildError, ValueError) as e:
            _fail(str(e))
        typer.echo(f"{p.id}  proposes commit {p.commit}\n"
                   f"Two approvers each run: mpactl broker trust report {p.id} --as THEM --approvers ...")

    @trust.command("report")
    def report(proposal_id: str, who: str = typer.Option(..., "--as", help="your engineer id"),
               approvers: str = typer.Option(..., "--approvers", help="measurement approvers: comma list or file"),
               repo: Path = typer.Option(Path("."), "--repo", help="your own clone to build from"),
               ledger: Path = typer.Option(DEFAULT_LEDGER, "--ledger")) -> None:
        """Build the proposal's commit yourself and report the hash you got."""
        from policy import PolicyError
        allowed = _approvers(approvers)
        led = measure_mod.MeasurementLedger(ledger)
        try:
            p = led.get(proposal_id)
            m = measure_mod.measure(repo, p.commit)
            p = led.report(proposal_id, approver=who, sha384_hex=m.sha384, approvers=allowed,
                           now=datetime.now(UTC))
        except KeyError as e:
            _fail(str(e.args[0]))
        except (measure_mod.BuildError, PolicyError) as e:
            _fail(str(e))
        typer.echo(f"you built {m.sha384}\nproposal {p.id} is {p.state.value} "
                   f"({len(p.reports)}/{p.required} reports)")
        if p.state is measure_mod.ProposalState.DISPUTED:
            _fail("hashes differ between approvers: the proposal can never be accepted; find out why", 3)

    @trust.command("show")
    def show(ledger: Path = typer.Option(DEFAULT_LEDGER, "--ledger")) -> None:
        """Print the trusted measurement in force."""
        t = measure_mod.MeasurementLedger(ledger).trusted()
        typer.echo(json.dumps(t, indent=1) if t else "no trusted measurement yet")


    @broker.command("seal-seeds")
    def seal_seeds(key_id: str = typer.Option(..., "--kms-key-id", help="KMS key (id, ARN or alias) whose "
                                              "policy pins the broker's measurement"),
                   out: Path = typer.Option(..., "--out", help="where to write the sealed seed bundle"),
                   kms_region: str = typer.Option("eu-west-2", "--kms-region"),
                   kms_endpoint: str | None = typer.Option(None, "--kms-endpoint"),
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
            _fail(f"{out} exists; refusing to overwrite seed secrets (move it away first)")
        aws = None
        if with_aws_keys:
            kid, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
            if not kid or not secret:
                _fail("--with-aws-keys needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment")
            aws = {"access_key_id": kid, "secret_access_key": secret}
        bundle = SeedBundle.generate(aws=aws, slack_webhook_url=slack_webhook_url)
        client = boto3.client("kms", region_name=kms_region, endpoint_url=kms_endpoint)
        try:
            sealed = seal_bundle(bundle, key_id, boto3_encrypter(client, key_id))
        except KmsError as e:
            _fail(str(e))
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
              oidc_listen: str = typer.Option("", "--oidc-listen",
                                              help="host:port to serve the Kubernetes issuer's discovery + JWKS"),
              cert_out: Path = typer.Option(Path("broker.pem"), "--cert-out",
                                            help="where to write the broker's certificate (clients pin it)"),
              seeds: Path | None = typer.Option(None, "--seeds", help="sealed seed bundle (production)"),
              kms_region: str = typer.Option("eu-west-2", "--kms-region"),
              kms_endpoint: str | None = typer.Option(None, "--kms-endpoint",
                                                         help="KMS endpoint URL (through the egress proxy)"),
              nsm_device: str = typer.Option("/dev/nsm", "--nsm", help="the Nitro Security Module device"),
              simulate: Path | None = typer.Option(
                  None, "--simulate", help="DEMO ONLY: simulated NSM and a local KMS kept in this folder"),
              ledger: Path | None = typer.Option(None, "--ledger",
                                                    help="with --simulate: pin the ledger's trusted measurement"),
              repo: Path = typer.Option(Path("."), "--repo", help="with --simulate: what the enclave 'runs'")) -> None:
        """Run the broker: open seeds through KMS with an attestation document, then serve.

        In an enclave: --seeds FILE (and the real /dev/nsm and KMS). Locally: --simulate DIR, which
        measures --repo's HEAD as the simulated image (PCR0) and makes a local KMS whose key
        policy pins the --ledger's trusted measurement (or, without a ledger, this build).
        """
        import logging
        import signal
        import threading

        import boto3
        from botocore.config import Config

        aws_config = Config(connect_timeout=5, read_timeout=15, retries={"max_attempts": 3, "mode": "standard"})

        from .broker.config import BrokerConfig, ConfigError
        from .broker.notify import BrokerSlack, JsonlAuditLog
        from .broker.server import start_broker
        from .kms import Boto3KmsClient, KmsError
        from .seeds import SeedError, open_bundle

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            cfg = BrokerConfig.from_file(config)
        except ConfigError as e:
            _fail(str(e))
        try:
            if simulate is not None:
                bundle, attester = _simulated_seeds(simulate, repo, ledger)
            else:
                if seeds is None:
                    _fail("--seeds is required (or --simulate DIR for a local demo)")
                from .nsm import NsmDevice
                attester = NsmDevice(nsm_device)
                kms = Boto3KmsClient(boto3.client("kms", region_name=kms_region, endpoint_url=kms_endpoint,
                                                  config=aws_config))
                bundle = open_bundle(seeds.read_bytes(), kms, attester)
        except (SeedError, KmsError, OSError, measure_mod.BuildError) as e:
            _fail(f"seed secrets were not released, refusing to start: {e}")
        sts_kwargs = {}
        if bundle.aws:
            sts_kwargs = {"aws_access_key_id": bundle.aws.get("access_key_id"),
                          "aws_secret_access_key": bundle.aws.get("secret_access_key")}
        sts = boto3.client("sts", region_name=cfg.aws_region, endpoint_url=cfg.sts_endpoint_url,
                           config=aws_config, **sts_kwargs) \
            if cfg.roles else None
        host, _, port = listen.rpartition(":")
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
                _fail(f"the sealed seeds' Slack webhook is unusable: {e}")
        notifiers = [slack.notifier] if slack else []
        runtime = start_broker(cfg, bundle, state_path=state, audit=[JsonlAuditLog(audit_log)], sts_client=sts,
                               notifiers=notifiers, host=host, port=int(port), oidc_listen=oidc, cert_out=cert_out,
                               attester=attester)
        typer.echo(f"broker listening on {host}:{runtime.port} as {cfg.server_name}; certificate "
                   f"{runtime.tls.fingerprint} written to {cert_out}", err=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait()
        runtime.close()
        if slack:
            slack.close()


def _simulated_seeds(folder: Path, repo: Path, ledger: Path | None):
    """DEMO ONLY: what the enclave, NSM and KMS do, in one process, persisted in ``folder``.

    The simulated image measurement is the SHA-384 of this checkout's broker artifact; the local
    KMS key policy pins the trusted measurement from the ledger. Run code that two approvers did
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
    if ledger is not None:
        trusted = measure_mod.MeasurementLedger(ledger).trusted()
        if not trusted:
            raise measure_mod.BuildError(f"the ledger {ledger} has no trusted measurement yet")
        pinned = bytes.fromhex(trusted["sha384"])
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
