//! The READMEs are executable: `README.md` and `nats-config/README.md` are run block by block,
//! in order, against a private nats-server with the real `jetsync-applier` binary, and a command
//! they show that does not work fails the suite.
//!
//! # Marking the code blocks
//!
//! Every fenced block needs an info string (a bare ```` ``` ```` fails the test, so a new
//! command cannot silently escape). The first word is the language:
//!
//! - ```` ```sh ```` runs with `bash -e`; it must exit 0 unless it says `exit=N`. The words after
//!   the language are options: `exit=N` (the exit code the block must end with), `background`
//!   (a block that does not end by itself, such as `run`: started, left running while the next
//!   blocks run, killed at the end), and `no-run <reason>` (not run; the reason is required).
//! - ```` ```toml file=NAME ```` is written to `NAME` in the working directory, where the blocks
//!   after it read it; ```` ```toml no-run <reason> ```` is not.
//! - ```` ```text output ```` right after a `sh` block is its documented output: every non-empty
//!   line must occur in what the block printed (stdout and stderr).
//! - Any other language (`text`, `json`, `rust,ignore`, ...) is not run. `bash`, `shell` and
//!   `console` are refused: write `sh`.
//!
//! # What a block runs against
//!
//! Each document gets a fresh working directory (the `nats-config/` directory is linked into it,
//! so the repository-relative paths work) and a private nats-server on a free port. The blocks
//! of one document share the working directory and exported variables (as in one terminal).
//! Before a block runs, `127.0.0.1:4222` / `localhost:4222` become the private server's address
//! and every other `127.0.0.1:PORT` / `localhost:PORT` a free port (the same one in every block
//! of the document); `NATS_URL` and `JETSYNC_NATS__URL` name the private server. On `PATH`,
//! `jetsync-applier` is the binary under test. Two commands are shell functions:
//!
//! - `nats-server ARGS`: with `-c FILE`, checks the configuration with the real binary
//!   (`nats-server ARGS -t`, which fails on an unknown key, a missing file or an unset variable);
//!   then returns at once: the private server stands in for the server it would start.
//! - `cargo demo` and `cargo run -p jetsync-examples --example NAME [-- ARGS]` run the built
//!   examples; any other `cargo` command fails (mark its block `no-run`).
//!
//! Everything a block starts (`&` included) is killed at the end, failures included.
//!
//! Besides the blocks, the `## Operations` table of `README.md` is run: every command of its
//! first column, with its placeholders filled in and every optional part given, against the
//! configuration example (`jetsync.toml`); `run` in the background, the commands marked
//! "(applier stopped)" after it stopped on SIGTERM (exit 0, as documented).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use jetsync_e2e::{accounts_extra_config, applier_bin, heavy, wait_until};
use jetsync_testkit::NatsServer;

/// How long one block may take.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// One fenced code block of a markdown document.
#[derive(Debug, Clone)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    /// The first word of the info string (`sh`, `toml`, `text`, `rust,ignore`, ...).
    lang: String,
    /// The rest of the info string.
    options: Vec<String>,
    /// The content, with the fence's indentation removed.
    text: String,
}

impl Block {
    fn has(&self, option: &str) -> bool {
        self.options.iter().any(|o| o == option)
    }

    fn value(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
    }

    fn no_run(&self) -> bool {
        self.has("no-run")
    }
}

/// The fenced blocks of `markdown`, in order.
fn blocks(markdown: &str) -> Result<Vec<Block>> {
    let mut out = Vec::new();
    let mut lines = markdown.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let trimmed = line.trim_start();
        let Some(info) = trimmed.strip_prefix("```") else {
            continue;
        };
        let indent = line.len() - trimmed.len();
        let mut words = info.split_whitespace().map(str::to_owned);
        let lang = words.next().unwrap_or_default();
        // `no-run:` reads better before its reason; it means `no-run`.
        let options: Vec<String> = words
            .map(|w| if w == "no-run:" { "no-run".into() } else { w })
            .collect();
        let mut text = String::new();
        let mut closed = false;
        for (_, body) in lines.by_ref() {
            if body.trim() == "```" {
                closed = true;
                break;
            }
            let cut = body.len() - body.trim_start().len();
            text += &body[cut.min(indent)..];
            text.push('\n');
        }
        ensure!(closed, "line {}: code block never closed", i + 1);
        out.push(Block {
            line: i + 1,
            lang,
            options,
            text,
        });
    }
    Ok(out)
}

/// Checks that every block is either runnable or explicitly marked (see the module docs).
fn check_markers(doc: &str, blocks: &[Block]) -> Result<()> {
    for b in blocks {
        let at = format!("{doc}:{}", b.line);
        match b.lang.as_str() {
            "" => bail!(
                "{at}: a code block without an info string; mark it (```sh, ```toml file=NAME, \
                 ```text, ```sh no-run <reason>, ...)"
            ),
            "bash" | "shell" | "console" | "zsh" => {
                bail!("{at}: write ```sh for shell commands (see tests/e2e/readme.rs)")
            }
            "sh" | "toml" if b.no_run() => {
                let reason = b.options.iter().skip_while(|o| *o != "no-run").nth(1);
                ensure!(reason.is_some(), "{at}: `no-run` needs a reason after it");
            }
            "toml" => ensure!(
                b.value("file").is_some(),
                "{at}: a TOML block needs `file=NAME` (where it is written) or `no-run <reason>`"
            ),
            "sh" => {
                for o in &b.options {
                    ensure!(
                        o == "background" || o.starts_with("exit="),
                        "{at}: unknown option {o:?} of a sh block"
                    );
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Kills (SIGKILL) every process group it holds when dropped, panics included.
#[derive(Default)]
struct Groups(Vec<(u32, Child)>);

impl Groups {
    fn push(&mut self, child: Child) {
        self.0.push((child.id(), child));
    }
}

impl Drop for Groups {
    fn drop(&mut self) {
        for (pgid, child) in &mut self.0 {
            // A negative pid names the process group the block's bash leads.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pgid}")])
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The built example binaries' directory (built once per test process).
fn examples_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "jetsync-examples", "--examples"])
            .arg("--manifest-path")
            .arg(&manifest);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build for the examples");
        assert!(status.success(), "building the examples failed");
        let exe = std::env::current_exe().expect("current exe");
        exe.parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps")
            .join("examples")
    })
}

/// Runs the blocks of one document in order.
struct Runner {
    doc: String,
    /// The working directory of the blocks.
    work: PathBuf,
    /// Scratch files of the runner (state between blocks, outputs, the `bin` directory).
    state: PathBuf,
    server_port: u16,
    ports: BTreeMap<u16, u16>,
    groups: Groups,
    /// Combined output of the last finished `sh` block.
    last_output: Option<(usize, String)>,
    /// Blocks run and blocks skipped, for the test's report.
    log: Vec<String>,
}

const PRELUDE: &str = r#"
[ -f "$__STATE/env.sh" ] && . "$__STATE/env.sh"
cd "$(cat "$__STATE/cwd")"
trap 'export -p > "$__STATE/env.sh"; pwd > "$__STATE/cwd"' EXIT
set -e
nats-server() {
  case " $* " in
    *" -c "*|*" --config "*) "$__NATS_SERVER" "$@" -t ;;
    *) echo "README test: the private server at $NATS_URL stands in for nats-server $*" ;;
  esac
}
cargo() {
  if [ "$1" = demo ] && [ $# = 1 ]; then "$__EXAMPLES/demo"; return; fi
  if [ "$1 $2 $3 $4" = "run -p jetsync-examples --example" ] && [ -n "$5" ]; then
    local name="$5"; shift 5
    if [ "$1" = -- ]; then shift; fi
    "$__EXAMPLES/$name" "$@"; return
  fi
  echo "README test: 'cargo $*' is not run here; mark its block no-run with a reason" >&2
  return 127
}
"#;

impl Runner {
    fn new(doc: &str, root: &Path, server_port: u16) -> Result<Runner> {
        let work = root.join("work");
        let state = root.join("state");
        fs::create_dir_all(&work)?;
        fs::create_dir_all(state.join("bin"))?;
        std::os::unix::fs::symlink(applier_bin(), state.join("bin/jetsync-applier"))?;
        std::os::unix::fs::symlink(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../nats-config"),
            work.join("nats-config"),
        )?;
        fs::write(state.join("cwd"), work.to_str().context("utf-8 path")?)?;
        Ok(Runner {
            doc: doc.into(),
            work,
            state,
            server_port,
            ports: BTreeMap::new(),
            groups: Groups::default(),
            last_output: None,
            log: Vec::new(),
        })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.server_port)
    }

    /// Replaces `127.0.0.1:PORT` and `localhost:PORT` (see the module docs).
    fn rewrite(&mut self, text: &str) -> Result<String> {
        let mut out = String::new();
        let mut rest = text;
        loop {
            let at = ["127.0.0.1:", "localhost:"]
                .iter()
                .filter_map(|h| rest.find(h).map(|i| (i, h.len())))
                .min();
            let Some((i, len)) = at else {
                out += rest;
                return Ok(out);
            };
            out += &rest[..i + len];
            rest = &rest[i + len..];
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                continue;
            }
            let port: u16 = rest[..digits].parse()?;
            let new = if port == 4222 {
                self.server_port
            } else if let Some(p) = self.ports.get(&port) {
                *p
            } else {
                let p = jetsync_testkit::free_port()?;
                self.ports.insert(port, p);
                p
            };
            out += &new.to_string();
            rest = &rest[digits..];
        }
    }

    fn command(&self, script: &str) -> Result<Command> {
        let path = format!(
            "{}:{}",
            self.state.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let nats_server = jetsync_testkit::nats_server_binary()?;
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(format!("{PRELUDE}\n{script}"))
            .current_dir(&self.work)
            .env("PATH", path)
            .env("NATS_URL", self.url())
            .env("JETSYNC_NATS__URL", self.url())
            .env("__STATE", &self.state)
            .env("__NATS_SERVER", nats_server)
            .env("__EXAMPLES", examples_dir())
            .env("RUST_LOG", "warn")
            .env_remove("JETSYNC_CONFIG")
            .stdin(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        Ok(cmd)
    }

    fn run(&mut self, blocks: &[Block]) -> Result<()> {
        for b in blocks {
            let at = format!("{}:{}", self.doc, b.line);
            match (b.lang.as_str(), b.no_run()) {
                ("sh" | "toml", true) => {
                    let reason = b.options.iter().skip_while(|o| *o != "no-run").skip(1);
                    let reason: Vec<&str> = reason.map(String::as_str).collect();
                    self.log
                        .push(format!("{at} {} not run: {}", b.lang, reason.join(" ")));
                }
                ("toml", false) => {
                    let name = b.value("file").context("file=")?;
                    let text = self.rewrite(&b.text)?;
                    let cwd = fs::read_to_string(self.state.join("cwd"))?;
                    fs::write(Path::new(cwd.trim()).join(name), text)?;
                    self.log.push(format!("{at} toml written to {name}"));
                }
                ("sh", false) => self.run_sh(&at, b)?,
                ("text", false) if b.has("output") => {
                    let Some((line, output)) = self.last_output.take() else {
                        bail!("{at}: an output block must follow a sh block that ran");
                    };
                    for expected in b.text.lines().filter(|l| !l.trim().is_empty()) {
                        let expected = self.rewrite(expected.trim())?;
                        ensure!(
                            output.contains(&expected),
                            "{}:{line}: the output lacks the documented line {expected:?} \
                             ({at}); it printed:\n{output}",
                            self.doc
                        );
                    }
                    self.log
                        .push(format!("{at} output of the block at line {line} checked"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn run_sh(&mut self, at: &str, b: &Block) -> Result<()> {
        let script = self.rewrite(&b.text)?;
        let n = self.groups.0.len();
        let out_path = self.state.join(format!("block-{n}.out"));
        let mut cmd = self.command(&script)?;
        let file = fs::File::create(&out_path)?;
        cmd.stdout(file.try_clone()?).stderr(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("{at}: spawning bash"))?;
        self.groups.push(child);
        if b.has("background") {
            self.log.push(format!("{at} sh started in the background"));
            return Ok(());
        }
        let expected: i32 = b.value("exit").unwrap_or("0").parse()?;
        let child = &mut self.groups.0.last_mut().expect("just pushed").1;
        let deadline = Instant::now() + BLOCK_TIMEOUT;
        let code = loop {
            if let Some(status) = child.try_wait()? {
                break status.code().unwrap_or(-1);
            }
            if Instant::now() >= deadline {
                let output = fs::read_to_string(&out_path).unwrap_or_default();
                bail!("{at}: still running after {BLOCK_TIMEOUT:?}; output:\n{output}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let output = fs::read_to_string(&out_path).unwrap_or_default();
        ensure!(
            code == expected,
            "{at}: the block exited with {code}, the README says {expected}; script:\n{script}\n\
             output:\n{output}"
        );
        self.log.push(format!("{at} sh ran, exit {code}"));
        self.last_output = Some((b.line, output));
        Ok(())
    }

    /// Runs `jetsync-applier ARGS` like a block would (same directory, environment, PATH);
    /// (exit code, stdout followed by stderr).
    fn applier(&mut self, args: &str, timeout: Duration) -> Result<(i32, String)> {
        self.sh(&format!("exec jetsync-applier {args}"), timeout)
    }

    /// Runs `script` like a block would; (exit code, stdout followed by stderr).
    fn sh(&mut self, script: &str, timeout: Duration) -> Result<(i32, String)> {
        let args = script;
        let script = self.rewrite(script)?;
        let cmd = self.command(&script)?;
        let (code, out, err) = jetsync_e2e::run_with_timeout(cmd, &self.state, timeout)?;
        let code = code.with_context(|| format!("`{args}` still running after {timeout:?}"))?;
        Ok((code, format!("{out}{err}")))
    }
}

fn repo_file(relative: &str) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// The commands of the `## Operations` table: (command, description).
fn operations_table(readme: &str) -> Result<Vec<(String, String)>> {
    let section = readme
        .split("\n## Operations\n")
        .nth(1)
        .context("README has no ## Operations section")?;
    let mut rows = Vec::new();
    for line in section.lines().skip_while(|l| !l.starts_with("| command")) {
        if !line.starts_with('|') {
            break;
        }
        let Some((first, description)) = line[1..].split_once(" | ") else {
            continue;
        };
        if first.trim() == "command" || first.starts_with("---") {
            continue;
        }
        rows.push((first.trim().to_owned(), description.to_owned()));
    }
    ensure!(
        rows.len() >= 5,
        "the Operations table looks empty: {rows:?}"
    );
    Ok(rows)
}

/// The invocations one cell of the Operations table stands for: the first code span with
/// every optional part given and the placeholders filled in, plus one per alternative
/// (`` / `--delete` `` or `` \| --all ``), which replaces the last option.
fn invocations(cell: &str) -> Result<Vec<String>> {
    let spans: Vec<&str> = cell.split('`').skip(1).step_by(2).collect();
    let first = spans.first().context("no command in the cell")?;
    let mut parts = first.split("\\|");
    let base = parts.next().unwrap_or_default();
    let mut alternatives: Vec<&str> = parts.collect();
    alternatives.extend(spans.iter().skip(1));
    let fill = |text: &str| -> String {
        text.replace(['[', ']'], "")
            .split_whitespace()
            .filter(|w| *w != "...")
            .map(|w| match w {
                "T" => "products".to_owned(),
                "K" => "A-9".to_owned(),
                "N" => "1".to_owned(),
                "ROW" => r#"'{"sku":"A-9","name":"Lamp","qty":2}'"#.to_owned(),
                "TABLE/KEY" => "products/A-9".to_owned(),
                w => w.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let base = fill(base);
    let mut out = vec![base.clone()];
    for alt in alternatives {
        // Cut the base before its last option (`--flag [VALUE]`) and put the alternative there.
        let words: Vec<&str> = base.split(' ').collect();
        let last = words
            .iter()
            .rposition(|w| w.starts_with("--"))
            .context("an alternative needs an option to replace")?;
        out.push(format!("{} {}", words[..last].join(" "), fill(alt)));
    }
    Ok(out)
}

/// Runs the Operations table against the configuration example (`jetsync.toml`).
fn run_operations(runner: &mut Runner, readme: &str) -> Result<()> {
    let rows = operations_table(readme)?;
    let config = "--config jetsync.toml";
    let t = Duration::from_secs(30);
    let (mut live, mut stopped) = (Vec::new(), Vec::new());
    let mut has_run = false;
    for (cell, description) in &rows {
        for inv in invocations(cell)? {
            if inv == "run" {
                has_run = true;
            } else if description.contains("(applier stopped)") {
                stopped.push(inv);
            } else {
                live.push(inv);
            }
        }
    }
    ensure!(has_run, "the Operations table has no `run`");
    // `run` in the background.
    let mut cmd = runner.command(&format!("exec jetsync-applier {config} run"))?;
    let log_path = runner.state.join("run.log");
    let log = fs::File::create(&log_path)?;
    cmd.stdout(log.try_clone()?).stderr(log);
    let child = cmd.spawn()?;
    runner.groups.push(child);
    let run_index = runner.groups.0.len() - 1;
    wait_until("run to be consuming", Duration::from_secs(30), || {
        let (code, out) = runner.applier(&format!("{config} status --json"), t).ok()?;
        let json = out.split_once("\n}\n").map(|(j, _)| format!("{j}\n}}"))?;
        let v: serde_json::Value = serde_json::from_str(&json).ok()?;
        (code == 0 && !v["groups"][0]["consumer"].is_null()).then_some(())
    })
    .with_context(|| fs::read_to_string(&log_path).unwrap_or_default())?;
    for inv in &live {
        let (code, out) = runner.applier(&format!("{config} {inv}"), t)?;
        ensure!(code == 0, "Operations: `{inv}` exited {code}:\n{out}");
        runner
            .log
            .push(format!("Operations: `{inv}` ok (while run runs)"));
    }
    // SIGTERM: the batch in hand is finished and run exits 0.
    let pid = runner.groups.0[run_index].0;
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -TERM {pid} failed");
    let child = &mut runner.groups.0[run_index].1;
    let code = wait_until("run to exit on SIGTERM", Duration::from_secs(30), || {
        child.try_wait().ok().flatten().map(|s| s.code())
    })?;
    ensure!(
        code == Some(0),
        "run exited {code:?} on SIGTERM, the README says 0:\n{}",
        fs::read_to_string(&log_path).unwrap_or_default()
    );
    runner
        .log
        .push("Operations: `run` ok, exit 0 on SIGTERM".into());
    for inv in &stopped {
        let (code, out) = runner.applier(&format!("{config} {inv}"), t)?;
        ensure!(code == 0, "Operations: `{inv}` exited {code}:\n{out}");
        runner
            .log
            .push(format!("Operations: `{inv}` ok (applier stopped)"));
    }
    // Exit codes: 2 for usage and configuration errors, and every command takes --json.
    let (code, out) = runner.applier(&format!("{config} no-such-command"), t)?;
    ensure!(code == 2, "an unknown command exited {code}, not 2:\n{out}");
    for (cell, _) in &rows {
        let inv = &invocations(cell)?[0];
        if inv == "run" {
            continue;
        }
        let json = if inv.starts_with("publish") {
            "--json-output"
        } else {
            "--json"
        };
        let (code, out) = runner.applier(&format!("{config} {inv} {json}"), t)?;
        ensure!(code == 0, "`{inv} {json}` exited {code}:\n{out}");
    }
    runner
        .log
        .push("Operations: exit 2 on usage errors, --json accepted".into());
    Ok(())
}

#[test]
fn readme_blocks_and_operations_table_run() -> Result<()> {
    let _heavy = heavy();
    let readme = repo_file("README.md")?;
    let blocks = blocks(&readme)?;
    check_markers("README.md", &blocks)?;
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let mut runner = Runner::new("README.md", root.path(), server.port())?;
    runner.run(&blocks)?;
    run_operations(&mut runner, &readme)?;
    eprintln!("{}", runner.log.join("\n"));
    Ok(())
}

#[test]
fn nats_config_readme_blocks_run() -> Result<()> {
    let _heavy = heavy();
    let doc = repo_file("nats-config/README.md")?;
    let blocks = blocks(&doc)?;
    check_markers("nats-config/README.md", &blocks)?;
    // The document's secure server: the users of accounts.conf with the passwords its
    // `export JETSYNC_ADMIN_PASSWORD=...` line sets.
    let export = doc
        .lines()
        .find(|l| l.starts_with("export JETSYNC_ADMIN_PASSWORD="))
        .context("nats-config/README.md no longer exports the passwords")?;
    let passwords: Vec<(&str, &str)> = export
        .split_whitespace()
        .skip(1)
        .take_while(|w| !w.starts_with('#'))
        .map(|w| w.split_once('=').context("NAME=VALUE"))
        .collect::<Result<_>>()?;
    let server = NatsServer::builder()
        .extra_config(accounts_extra_config(&passwords)?)
        .start()?;
    let root = tempfile::tempdir()?;
    let mut runner = Runner::new("nats-config/README.md", root.path(), server.port())?;
    runner.run(&blocks)?;
    // The applier the document left running under its restricted user applies what the
    // publisher's user publishes, and `status` works under the applier's user.
    let t = Duration::from_secs(30);
    let publisher =
        "JETSYNC_NATS__USER=catalog-pub JETSYNC_NATS__PASSWORD=\"$CATALOG_PUB_PASSWORD\" \
                     JETSYNC_NATS__INBOX_PREFIX=_INBOX_catalog_pub jetsync-applier \
                     --config catalog-1.toml";
    let (code, out) = runner.sh(
        &format!("{publisher} publish --table products --key A-1 --json '{{\"sku\":\"A-1\"}}'"),
        t,
    )?;
    ensure!(code == 0, "publishing as catalog-pub exited {code}:\n{out}");
    let status = "JETSYNC_NATS__PASSWORD=\"$CATALOG_1_PASSWORD\" \
                  jetsync-applier --config catalog-1.toml status --json";
    wait_until("catalog-1 to apply the event", t, || {
        let (code, out) = runner.sh(status, t).ok()?;
        let json = out.split_once("\n}\n").map(|(j, _)| format!("{j}\n}}"))?;
        let v: serde_json::Value = serde_json::from_str(&json).ok()?;
        (code == 0 && v["groups"][0]["applied_seq"] == 1).then_some(())
    })?;
    runner
        .log
        .push("the restricted applier applied an event published as catalog-pub".into());
    eprintln!("{}", runner.log.join("\n"));
    Ok(())
}

#[test]
fn the_block_parser_reads_info_strings_and_indented_blocks() -> Result<()> {
    let md =
        "text\n```sh exit=1\nfalse\n```\n\n  ```toml file=a.toml\n  x = 1\n  ```\n```\nbare\n```\n";
    let b = blocks(md)?;
    assert_eq!(b.len(), 3);
    assert_eq!((b[0].lang.as_str(), b[0].value("exit")), ("sh", Some("1")));
    assert_eq!(
        (b[1].value("file"), b[1].text.as_str()),
        (Some("a.toml"), "x = 1\n")
    );
    assert!(
        check_markers("t", &b).is_err(),
        "a bare block must be refused"
    );
    assert!(check_markers("t", &blocks("```sh no-run\nx\n```\n")?).is_err());
    assert!(check_markers("t", &blocks("```sh no-run needs a cluster\nx\n```\n")?).is_ok());
    let inv = invocations("`publish --table T --key K --json ROW` / `--delete`")?;
    assert_eq!(inv[1], "publish --table products --key A-9 --delete");
    let inv = invocations("`parked drop --row TABLE/KEY ... \\| --all`")?;
    assert_eq!(inv, ["parked drop --row products/A-9", "parked drop --all"]);
    Ok(())
}
