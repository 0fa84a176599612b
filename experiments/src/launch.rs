//! Starting function processes as a serverless platform's launcher does and timing each one
//! whole, spawn to exit (`function_us`), beside what the function reports about itself
//! (connect → close, `latency_us`, and connect() alone).
//!
//! The launcher runs on a thread of the experiment that is on the client host
//! ([`Hosts::on_client`](crate::hosts::Hosts::on_client)) and starts each function directly,
//! with its environment set by the launcher and nothing between fork and exec: `Command` then
//! uses `posix_spawn` (a vfork-style clone), so the time measured is the function's own
//! (exec, dynamic loading, preload library, `main`, exit) plus a spawn that does not grow
//! with the experiment's size, and no wrapper (`env`, `ip netns exec`) is timed with it.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// What one invocation of a configuration runs.
#[derive(Debug, Clone)]
pub(crate) struct Invocation {
    /// The configuration's name (for errors).
    pub(crate) name: &'static str,
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    /// Set for the function on top of the launcher's environment, from which `LD_PRELOAD` and
    /// every `WARMPOOL_*` variable are removed first.
    pub(crate) env: Vec<(&'static str, OsString)>,
    /// Whether the program prints `<latency µs> <connect µs>` (the `function` subcommand).
    pub(crate) reports: bool,
}

/// One invocation's times, µs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// connect → close inside the function (with `Invocation::reports`).
    pub(crate) latency_us: Option<f64>,
    /// connect() alone, inside the function.
    pub(crate) connect_us: Option<f64>,
    /// Spawn to exit, measured by the launcher.
    pub(crate) function_us: f64,
}

impl Invocation {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args).env_remove("LD_PRELOAD");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("WARMPOOL_") {
                c.env_remove(k);
            }
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    }

    /// Run it once: spawn, read its output to the end, reap it.
    pub(crate) fn run(&self) -> Result<Sample> {
        let mut cmd = self.command();
        let t0 = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("{}: spawning {}", self.name, self.program.display()))?;
        let (mut out, mut err) = (String::new(), String::new());
        child.stdout.take().context("stdout")?.read_to_string(&mut out)?;
        child.stderr.take().context("stderr")?.read_to_string(&mut err)?;
        let status = child.wait()?;
        let function_us = t0.elapsed().as_secs_f64() * 1e6;
        if !status.success() {
            bail!("{} function failed ({status}): {err}", self.name);
        }
        if !self.reports {
            return Ok(Sample { latency_us: None, connect_us: None, function_us });
        }
        let mut f = out.split_whitespace().map(str::parse::<f64>);
        match (f.next(), f.next()) {
            (Some(Ok(total)), Some(Ok(connect))) => Ok(Sample { latency_us: Some(total), connect_us: Some(connect), function_us }),
            _ => bail!("{} function printed {out:?}", self.name),
        }
    }
}

/// `warmup` unrecorded rounds, then `runs` rounds; a round runs every invocation of `plan` once,
/// in order (configurations interleaved). Returns the samples per invocation.
pub(crate) fn rounds(plan: &[Invocation], warmup: usize, runs: usize, bar: &indicatif::ProgressBar) -> Result<Vec<Vec<Sample>>> {
    for _ in 0..warmup {
        for inv in plan {
            inv.run()?;
        }
    }
    let mut samples: Vec<Vec<Sample>> = plan.iter().map(|_| Vec::with_capacity(runs)).collect();
    for _ in 0..runs {
        for (inv, s) in plan.iter().zip(&mut samples) {
            s.push(inv.run()?);
        }
        bar.inc(1);
    }
    Ok(samples)
}

/// The source of the empty preload library (see the file).
const EMPTY_PRELOAD_C: &str = include_str!("../c/empty_preload.c");

/// Compile the empty preload library into `dir` with the system C compiler.
pub(crate) fn build_empty_preload(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("empty_preload.c");
    let lib = dir.join("libempty_preload.so");
    std::fs::write(&src, EMPTY_PRELOAD_C)?;
    let o = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-nostdlib", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .context("running cc (scripts/setup.sh installs build-essential)")?;
    if !o.status.success() {
        bail!("cc {}: {}", src.display(), String::from_utf8_lossy(&o.stderr));
    }
    Ok(lib)
}

/// Send `sig` to the child process `pid` that this experiment started (nothing if it is gone).
pub(crate) fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_preload_has_no_code_to_run_and_needs_nothing() {
        let dir = std::env::temp_dir().join(format!("warmpool-empty-preload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lib = build_empty_preload(&dir).unwrap();
        let o = Command::new("readelf").arg("-d").arg(&lib).output().expect("readelf (binutils)");
        let dynamic = String::from_utf8_lossy(&o.stdout);
        for tag in ["(NEEDED)", "(INIT)", "(FINI)", "(INIT_ARRAY)", "(FINI_ARRAY)"] {
            assert!(!dynamic.contains(tag), "{tag} in\n{dynamic}");
        }
        // A program runs under it as usual, with it mapped, and the launcher times it.
        let maps = Command::new("/bin/cat").arg("/proc/self/maps").env("LD_PRELOAD", &lib).output().unwrap();
        assert!(maps.status.success() && maps.stderr.is_empty(), "{}", String::from_utf8_lossy(&maps.stderr));
        assert!(String::from_utf8_lossy(&maps.stdout).contains("libempty_preload.so"));
        let inv = Invocation {
            name: "true-empty-preload",
            program: "/bin/true".into(),
            args: vec![],
            env: vec![("LD_PRELOAD", lib.clone().into())],
            reports: false,
        };
        let s = inv.run().unwrap();
        assert!(s.function_us > 0.0 && s.latency_us.is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
