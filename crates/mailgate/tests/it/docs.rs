//! Every code example in the documentation runs, as written, against a real `mailgate serve --demo`
//! with real client libraries (Python's from `.venv`, `tests/python/requirements.txt`; Node's from
//! `tests/node/node_modules`, `tests/node/package-lock.json`; both installed by `scripts/test`).
//!
//! # The conventions a documentation writer follows
//!
//! - **Which files.** `README.md` and every `docs/*.md` (found at run time: a new file is picked up
//!   without a change here). `docs/reasons.md` too (it is generated, and has no runnable block).
//! - **Which blocks run.** A fenced block whose info string starts with `python` (or `py`), `js`,
//!   `javascript` or `node`, or `sh`, `bash`, `shell` or `console` is run. Blocks tagged `json`,
//!   `yaml`, `yml`, `toml`, `text`, `txt`, `ini`, `http` or `diff`, and untagged blocks, are data,
//!   configuration or sample output and are not run. A block in any other language (`go`, `rust`,
//!   ...) must carry the not-run mark below, or the test fails.
//! - **Not run.** The line right before the opening fence (blank lines between are allowed) is
//!   `<!-- not run: <reason> -->` with a reason. An unmarked runnable block that the runner cannot
//!   run fails the test; a mark with an empty reason fails it too.
//! - **Expected exit status.** A shell block whose last command is meant to fail says so the same
//!   way: `<!-- exit: 3 -->` (for example `mailgate explain` of a denied send). Without it a block
//!   must exit 0.
//! - **One session per file.** Each file runs in a fresh working directory in which the harness
//!   has started `mailgate serve --demo` with no config file, as a newcomer does: the documented
//!   default ports (HTTP 7080, HTTPS 7443, SMTP submission 7587, SMTPS 7465, relay 7525) and data
//!   directory `./mailgate-data` (demo credentials in `mailgate-data/demo-credentials.txt`, the
//!   demo certificate in `mailgate-data/tls/cert.pem`). So the docs tests run one at a time (the
//!   nextest group `docs`, `.config/nextest.toml`). The blocks of a file run in order and share that
//!   directory and its files (a block may use `key.json` that an earlier block wrote). The working
//!   directory also holds `docs` (a link to the repository's `docs/`, so `docs/examples/org.yaml`
//!   works as from a checkout) and `node_modules` (a link to `tests/node/node_modules`).
//! - **Shell blocks** run with `bash -e -o pipefail`, with the built `mailgate` first on `PATH`;
//!   the one substitution: `cargo run --release --` becomes `mailgate`. A block that only starts
//!   the server (`mailgate serve --demo`) is the server the harness started: it counts as run.
//!   Variables a shell block exports (`export SENDGRID_API_KEY=...`) are set for every later block
//!   of the same file, shell, Python and Node: the test sets exactly what the docs tell the user to
//!   set, by running those lines. Comment lines (`# {"status":"ok",...}`) show sample output and are
//!   not compared.
//! - **Python blocks** are written to a file and run with `$MAILGATE_PYTHON`. **Node blocks** are
//!   written to `example.mjs` when they use `import` (ES module: top-level `await` works) and to
//!   `example.cjs` otherwise (CommonJS: no top-level `await`), and run with `node`. A block is a
//!   whole program: imports, credentials and the call.
//! - **Nothing leaves the machine.** Python and Node run with a guard (a `sitecustomize.py` on
//!   `PYTHONPATH`; `node --require`) that refuses every TCP connection and name lookup that is not
//!   loopback: an example that would reach Google or SendGrid fails with the host it tried.
//! - **Pass** means exit status 0 (or the marked one) within 90 s; on failure the test prints the
//!   file, the block's line, its source and its output, and goes on to report every failing block.
