//! The deployment examples (issue #15, `examples/deploy/`): the systemd unit passes
//! `systemd-analyze verify` (skipped loudly where the tool is missing) and runs the applier as
//! the instance its name gives; the Kubernetes manifests parse and hold the field paths the
//! applier depends on (instance id from the pod name, a volume per pod, probes on `/healthz`
//! and `/readyz` on the port `http.listen` opens).

use std::{io::Write as _, path::PathBuf, process::Command};

use anyhow::{ensure, Context, Result};
use yaml_rust2::{Yaml, YamlLoader};

fn deploy_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/deploy")
        .join(rel)
}

/// The value at `path` (keys, or `[i]` for a list index) below `doc`.
fn at<'a>(doc: &'a Yaml, path: &str) -> Result<&'a Yaml> {
    let mut node = doc;
    for part in path.split('.') {
        let (key, index) = match part.split_once('[') {
            Some((key, rest)) => (key, Some(rest.trim_end_matches(']').parse::<usize>()?)),
            None => (part, None),
        };
        if !key.is_empty() {
            node = &node[key];
        }
        if let Some(i) = index {
            node = &node[i];
        }
        ensure!(!node.is_badvalue(), "no {path} (at {part})");
    }
    Ok(node)
}

fn text<'a>(doc: &'a Yaml, path: &str) -> Result<&'a str> {
    at(doc, path)?
        .as_str()
        .with_context(|| format!("{path} is not a string"))
}

/// The list element of `list` whose `name` is `name`.
fn named<'a>(list: &'a Yaml, name: &str) -> Result<&'a Yaml> {
    list.as_vec()
        .context("not a list")?
        .iter()
        .find(|item| item["name"].as_str() == Some(name))
        .with_context(|| format!("no element named {name}"))
}

#[test]
fn kubernetes_statefulset_runs_the_applier_as_a_sidecar() -> Result<()> {
    let path = deploy_file("kubernetes/statefulset.yaml");
    let docs = YamlLoader::load_from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    let kind = |k: &str| -> Result<&Yaml> {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(k))
            .with_context(|| format!("no {k} in {}", path.display()))
    };
    let set = kind("StatefulSet")?;
    ensure!(text(set, "apiVersion")? == "apps/v1");
    let spec = at(set, "spec.template.spec")?;
    let containers = at(spec, "containers")?;
    ensure!(
        containers.as_vec().map(Vec::len) == Some(2),
        "the service and the applier"
    );
    let applier = named(containers, "jetsync")?;
    // The instance id is the pod name, through the downward API.
    let instance = named(at(applier, "env")?, "JETSYNC_INSTANCE")?;
    ensure!(text(instance, "valueFrom.fieldRef.fieldPath")? == "metadata.name");
    // One data volume per pod, mounted by both containers.
    let claim = &at(set, "spec.volumeClaimTemplates")?[0];
    let volume = text(claim, "metadata.name")?;
    ensure!(text(claim, "spec.accessModes[0]")? == "ReadWriteOnce");
    for container in containers.as_vec().context("containers")? {
        named(at(container, "volumeMounts")?, volume)
            .with_context(|| format!("container {:?}", container["name"]))?;
    }
    // The config's data_dir is that volume; its http.listen port is the probes' port.
    let config_map = kind("ConfigMap")?;
    let toml_text = config_map["data"]["jetsync.toml"]
        .as_str()
        .context("ConfigMap data.jetsync.toml")?;
    let mut config: jetsync::Config = toml_from(toml_text)?;
    config.instance = "catalog-0".into();
    config.validate().context("the ConfigMap's jetsync.toml")?;
    let data = named(at(applier, "volumeMounts")?, volume)?;
    ensure!(config.data_dir == PathBuf::from(text(data, "mountPath")?));
    let listen = config.http.listen.context("http.listen must be set")?;
    let metrics = named(at(applier, "ports")?, "metrics")?;
    ensure!(at(metrics, "containerPort")?.as_i64() == Some(i64::from(listen.port())));
    ensure!(
        listen.ip().is_unspecified(),
        "the kubelet probes the pod IP"
    );
    ensure!(text(applier, "livenessProbe.httpGet.path")? == "/healthz");
    ensure!(text(applier, "readinessProbe.httpGet.path")? == "/readyz");
    ensure!(text(applier, "readinessProbe.httpGet.port")? == "metrics");
    let args: Vec<&str> = at(applier, "args")?
        .as_vec()
        .context("args")?
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    ensure!(args.last() == Some(&"run"), "{args:?}");
    let mounted = named(at(spec, "volumes")?, "config")?;
    ensure!(text(mounted, "configMap.name")? == text(config_map, "metadata.name")?);
    ensure!(text(set, "spec.serviceName")? == text(kind("Service")?, "metadata.name")?);
    Ok(())
}

/// Parses TOML into the configuration type the applier loads.
fn toml_from(text: &str) -> Result<jetsync::Config> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("jetsync.toml");
    std::fs::write(&file, format!("instance = \"catalog-0\"\n{text}"))?;
    Ok(jetsync::Config::load(Some(file.as_path()))?)
}

#[test]
fn systemd_unit_verifies() -> Result<()> {
    let unit = deploy_file("systemd/jetsync-applier@.service");
    let text = std::fs::read_to_string(&unit)?;
    for needle in [
        "Environment=JETSYNC_INSTANCE=%i",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "/readyz",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        " run\n",
    ] {
        ensure!(text.contains(needle), "the unit lacks {needle:?}");
    }
    // The shared config loads (with the instance the unit sets).
    let shared = std::fs::read_to_string(deploy_file("systemd/jetsync.toml"))?;
    toml_from(&shared)?.validate()?;

    let Ok(found) = Command::new("systemd-analyze").arg("--version").output() else {
        let _ = writeln!(
            std::io::stderr().lock(),
            "systemd_unit_verifies: SKIPPED `systemd-analyze verify` (no systemd-analyze here)"
        );
        return Ok(());
    };
    ensure!(found.status.success());
    // verify needs the ExecStart binary to exist: a copy of the unit pointing at the real
    // applier, instantiated as catalog-1.
    let dir = tempfile::tempdir()?;
    let bin = jetsync_e2e::applier_bin();
    let instance = dir.path().join("jetsync-applier@catalog-1.service");
    std::fs::write(
        &instance,
        text.replace("/usr/local/bin/jetsync-applier", &bin.display().to_string()),
    )?;
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&instance)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Lines about the host's own units (or the missing `jetsync` user on a build machine) are
    // not the unit's fault; everything naming our unit is.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("jetsync-applier@"))
        .filter(|l| !l.contains("User") && !l.contains("Group"))
        .collect();
    ensure!(
        out.status.success() || ours.is_empty(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    ensure!(ours.is_empty(), "systemd-analyze verify:\n{stderr}");
    Ok(())
}
