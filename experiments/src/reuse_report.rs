//! `summary.md` and the CDF charts of a `reuse` run, from the same samples as `reuse.csv`:
//! connect → close inside the function (`latency_us`) and the whole function, spawn to exit
//! (`function_us`), per configuration; the processes that connect nowhere; what the local
//! proxies did upstream; the pools' status; and issue 13's targets checked against the run.

use crate::hosts::Hosts;
use crate::launch::Sample;
use crate::proxy::UpstreamUse;
use crate::reuse::Config;
use anyhow::Result;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// A finished run, as the report needs it.
#[derive(Debug)]
pub(crate) struct Run<'a> {
    pub(crate) runs: usize,
    pub(crate) configs: &'a [Config],
    /// Per configuration, in `configs` order.
    pub(crate) samples: &'a [Vec<Sample>],
    pub(crate) hosts: &'a Hosts,
    /// (which daemon, `pool-manager status` output).
    pub(crate) status: &'a [(&'a str, String)],
    /// Per proxy, from the server nginx's log (our own server only).
    pub(crate) upstream: Option<&'a BTreeMap<String, UpstreamUse>>,
    pub(crate) out: &'a Path,
}

/// Median, p90, p99 of some µs values (0.1 µs resolution).
#[derive(Debug, Clone, Copy)]
struct Q {
    p50: f64,
    p90: f64,
    p99: f64,
}

impl Q {
    fn of(values: impl Iterator<Item = f64>) -> Option<Self> {
        let mut h: Histogram<u64> = Histogram::new(3).ok()?;
        for v in values {
            h.record((v * 10.0).max(0.0) as u64).ok()?;
        }
        let q = |p: f64| h.value_at_quantile(p) as f64 / 10.0;
        (!h.is_empty()).then(|| Self { p50: q(0.5), p90: q(0.9), p99: q(0.99) })
    }
}

/// Per-configuration quantiles of both metrics and of connect().
#[derive(Debug)]
struct Stats {
    latency: Option<Q>,
    connect: Option<Q>,
    function: Option<Q>,
}

impl Run<'_> {
    fn stats(&self, c: Config) -> Option<Stats> {
        let s = &self.samples[self.configs.iter().position(|x| *x == c)?];
        Some(Stats {
            latency: Q::of(s.iter().filter_map(|s| s.latency_us)),
            connect: Q::of(s.iter().filter_map(|s| s.connect_us)),
            function: Q::of(s.iter().map(|s| s.function_us)),
        })
    }
    fn median(&self, c: Config, f: impl Fn(&Stats) -> Option<Q>) -> Option<f64> {
        self.stats(c).as_ref().and_then(f).map(|q| q.p50)
    }
    fn series(&self, f: impl Fn(&Sample) -> Option<f64>) -> Vec<crate::svg::Series> {
        self.configs
            .iter()
            .zip(self.samples)
            .filter_map(|(c, s)| {
                let v: Vec<f64> = s.iter().filter_map(&f).collect();
                (!v.is_empty()).then(|| crate::svg::Series { name: c.name().into(), points: crate::svg::cdf(&v) })
            })
            .collect()
    }
}

fn ratio(v: Option<f64>, base: Option<f64>) -> String {
    match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}x", v / b),
        _ => "-".into(),
    }
}

/// Write the two CDF charts into `run.out` and return `summary.md`'s text.
pub(crate) fn summary(run: &Run<'_>) -> Result<String> {
    let mut md = String::new();
    let _ = writeln!(md, "# Reuse test: connect → request → reply in a fresh process\n");
    let _ = writeln!(
        md,
        "{} runs per configuration, interleaved, real nginx; path: {}; machine: `{}`.\n",
        run.runs,
        run.hosts.describe(),
        crate::reuse::machine()
    );
    connecting_table(&mut md, run);
    noconnect_table(&mut md, run);
    proxies(&mut md, run);
    targets(&mut md, run);
    phases(&mut md, run);
    for (file, title, x_label, metric) in [
        ("reuse_cdf.svg", "Reuse test: connect to close inside the function", "connect → close (µs)", Metric::Latency),
        ("reuse_function_cdf.svg", "Reuse test: whole function, spawn to exit", "spawn → exit (µs)", Metric::Function),
    ] {
        let series = run.series(|s| metric.of(s));
        let chart = crate::svg::Chart {
            title,
            x_label,
            y_label: "CDF",
            x_scale: crate::svg::Scale::Linear,
            y_scale: crate::svg::Scale::Linear,
            series: &series,
        };
        crate::svg::write(&run.out.join(file), &crate::svg::render(&chart))?;
        let _ = writeln!(md, "![{x_label}]({file})\n");
    }
    let _ = writeln!(md, "## What the pools did\n\n```");
    for (what, status) in run.status {
        let _ = writeln!(md, "# {what}\n{status}");
    }
    let _ = writeln!(md, "```");
    Ok(md)
}

#[derive(Debug, Clone, Copy)]
enum Metric {
    Latency,
    Function,
}

impl Metric {
    fn of(self, s: &Sample) -> Option<f64> {
        match self {
            Self::Latency => s.latency_us,
            Self::Function => Some(s.function_us),
        }
    }
}

fn connecting_table(md: &mut String, run: &Run<'_>) {
    let base_l = run.median(Config::Baseline, |s| s.latency);
    let base_f = run.median(Config::Baseline, |s| s.function);
    let _ = writeln!(md, "## Functions that connect: inside the function and whole\n");
    let _ = writeln!(
        md,
        "| config | connect→close median µs | p90 | p99 | vs baseline | whole function median µs | p90 | p99 | vs baseline | connect() median µs | source study median µs |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let cell = |q: Option<Q>, base: Option<f64>| match q {
        Some(q) => format!("{:.1} | {:.1} | {:.1} | {}", q.p50, q.p90, q.p99, ratio(Some(q.p50), base)),
        None => "- | - | - | -".into(),
    };
    for &c in run.configs.iter().filter(|c| c.connects()) {
        let Some(s) = run.stats(c) else { continue };
        let src = c.source_median_us().map_or("-".into(), |v| format!("{v:.0}"));
        let connect = s.connect.map_or("-".into(), |q| format!("{:.1}", q.p50));
        let _ = writeln!(md, "| {} | {} | {} | {connect} | {src} |", c.name(), cell(s.latency, base_l), cell(s.function, base_f));
    }
    let _ = writeln!(md, "\nconnect→close (`latency_us`) is timed inside the function from just before connect() to after close();");
    let _ = writeln!(md, "the whole function (`function_us`) is timed by the launcher from spawn to exit (exec, dynamic loading,");
    let _ = writeln!(md, "the preload library's load and exit work, main, the request).");
    let _ = writeln!(md, "Source study: two CloudLab m510 nodes over 10 GbE (baseline 446 µs, dummy shim 459 µs, reuse 322 µs = 0.72x).");
    let _ =
        writeln!(md, "`warm` is the pool manager on its embedded default (first-use warm pools); `reuse` has a reuse pool for the server;");
    let _ =
        writeln!(md, "`prefetch` is that reuse pool with `prefetch`: the daemon offers the socket while the process starts, and connect()");
    let _ = writeln!(md, "takes it without a round trip to the daemon; `reuse-lazy` is the reuse pool with `WARMPOOL_LAZY=1`: the shim links to");
    let _ = writeln!(md, "the daemon at the first connect(), not at load time. `empty-preload` runs the function under an LD_PRELOAD library");
    let _ = writeln!(md, "that does nothing (a C object built with -nostdlib: no constructor, no destructor, no dependency), the floor of");
    let _ = writeln!(md, "any preload approach. `nginx-keepalive` and `haproxy` connect to a local proxy on the client host's loopback");
    let _ = writeln!(
        md,
        "that keeps its upstream connections across the emulated path alive (`upstream {{ keepalive }}`, `http-reuse always`)."
    );
    let _ =
        writeln!(md, "On loopback a handshake costs microseconds, so asking the daemon costs more than it saves; the emulated path gives");
    let _ = writeln!(md, "the handshake its RTT, as on a real network.\n");
}

fn noconnect_table(md: &mut String, run: &Run<'_>) {
    let none: Vec<Config> = run.configs.iter().copied().filter(|c| !c.connects()).collect();
    if none.is_empty() {
        return;
    }
    let floor = run.median(Config::TrueEmptyPreload, |s| s.function);
    let _ = writeln!(md, "## A process that connects nowhere (`/bin/true`), whole process\n");
    let _ = writeln!(md, "| config | spawn→exit median µs | p90 | p99 | vs true-empty-preload |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for c in none {
        if let Some(q) = run.stats(c).and_then(|s| s.function) {
            let _ = writeln!(md, "| {} | {:.1} | {:.1} | {:.1} | {} |", c.name(), q.p50, q.p90, q.p99, ratio(Some(q.p50), floor));
        }
    }
    let _ = writeln!(
        md,
        "\n`true-shim` runs under the shim with the reuse pool's daemon: the process opens its link at load time (so that the daemon identifies it while it starts) and asks for nothing; `true-shim-prefetch` with the prefetch pool's daemon: it also asks for offers at load time, and gives them back at exit; `true-shim-lazy` with `WARMPOOL_LAZY=1`: no link, the library alone.\n"
    );
}

fn proxies(md: &mut String, run: &Run<'_>) {
    let names: Vec<&str> = [Config::NginxKeepalive, Config::Haproxy].iter().filter(|c| run.configs.contains(c)).map(|c| c.name()).collect();
    if names.is_empty() {
        return;
    }
    let _ = writeln!(md, "## What the proxies did upstream (server nginx's log, warm-up rounds included)\n");
    let _ = writeln!(md, "| proxy | requests forwarded | upstream connections opened |");
    let _ = writeln!(md, "|---|---:|---:|");
    for name in names {
        let u = run.upstream.map(|u| u.get(name).copied().unwrap_or_default());
        let (r, n) = u.map_or(("-".into(), "-".into()), |u| (u.requests.to_string(), u.connections.to_string()));
        let _ = writeln!(md, "| {name} | {r} | {n} |");
    }
    let _ = writeln!(md);
}

/// The `warm` daemon's misses as a fraction of its hand-out decisions (status columns).
fn warm_miss_fraction(status: &str) -> Option<f64> {
    let mut lines = status.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (w, r, m) = (col("WARM")?, col("REUSE")?, col("MISS")?);
    let (mut hits, mut misses) = (0u64, 0u64);
    for l in lines.take_while(|l| !l.is_empty()) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        hits += n(w) + n(r);
        misses += n(m);
    }
    (hits + misses > 0).then(|| misses as f64 / (hits + misses) as f64)
}

/// The best any LD_PRELOAD approach could do in this run: the function under a library that
/// does nothing (`empty-preload`, the cost of being a preload library at all) with its connect()
/// taking no time. (whole function µs, connect → close µs.)
fn floor(run: &Run<'_>) -> (Option<f64>, Option<f64>) {
    let s = run.stats(Config::EmptyPreload);
    let connect = s.as_ref().and_then(|s| s.connect).map(|q| q.p50);
    let minus = |q: Option<Q>| q.map(|q| q.p50).zip(connect).map(|(v, c)| v - c);
    (minus(s.as_ref().and_then(|s| s.function)), minus(s.as_ref().and_then(|s| s.latency)))
}

fn targets(md: &mut String, run: &Run<'_>) {
    let f = |c| run.median(c, |s| s.function);
    let l = |c| run.median(c, |s| s.latency);
    let (floor_fn, floor_lat) = floor(run);
    let mut rows: Vec<(String, String, String, Option<bool>)> = vec![];
    let mut check = |what: String, v: Option<f64>, limit: Option<f64>, best: Option<f64>, unit: &str| {
        let met = v.zip(limit).map(|(v, lim)| v <= lim);
        let shown = match (v, limit) {
            (Some(v), Some(lim)) => format!("{v:.2}{unit} (limit {lim:.2}{unit})"),
            _ => "-".into(),
        };
        let best = best.map_or("-".into(), |b| format!("{b:.2}{unit}"));
        rows.push((what, shown, best, met));
    };
    let over = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    for pool in [Config::Reuse, Config::Prefetch] {
        let n = pool.name();
        let base = f(Config::Baseline);
        check(format!("whole function, {n} / baseline ≤ 0.85x"), over(f(pool), base), Some(0.85), over(floor_fn, base), "x");
        for proxy in [Config::NginxKeepalive, Config::Haproxy] {
            let p = proxy.name();
            check(format!("whole function, {n} < {p}"), f(pool), f(proxy).map(|v| v - 0.05), floor_fn, " µs");
        }
        let base = l(Config::Baseline);
        check(format!("connect→close, {n} / baseline ≤ 0.55x"), over(l(pool), base), Some(0.55), over(floor_lat, base), "x");
    }
    check(
        "connects nowhere, true-shim / true-empty-preload ≤ 1.03x".into(),
        over(f(Config::TrueShim), f(Config::TrueEmptyPreload)),
        Some(1.03),
        Some(1.0),
        "x",
    );
    let warm = run.status.first().filter(|_| run.configs.contains(&Config::Warm)).and_then(|(_, s)| warm_miss_fraction(s));
    check("`warm` misses < 5 % of invocations, one per round of this run (warm-up included)".into(), warm.map(|v| v * 100.0), Some(4.99), Some(0.0), " %");
    let _ = writeln!(md, "## Issue 13's targets, medians of this run\n");
    let _ = writeln!(
        md,
        "*Best a preload could do*: the function under `empty-preload` (the cost of being an LD_PRELOAD library at all) with its \
         connect() taking no time (its connect() median subtracted): no library, daemon or pooled-connect cost. A target beyond \
         it cannot be met by any LD_PRELOAD approach on this path.\n"
    );
    let _ = writeln!(md, "| target | this run | best a preload could do | met |");
    let _ = writeln!(md, "|---|---|---|---|");
    for (what, shown, best, met) in rows {
        let met = met.map_or("-", |m| if m { "yes" } else { "no" });
        let _ = writeln!(md, "| {what} | {shown} | {best} | {met} |");
    }
    let _ = writeln!(md);
}

/// Where the whole function's time goes, from differences of this run's medians: what being
/// a preload library costs at all, what warmpool's library adds on its own, and what the daemon
/// adds (the link at load, identification, hand-out, give-back) against the handshake it saves.
fn phases(md: &mut String, run: &Run<'_>) {
    let f = |c| run.median(c, |s| s.function);
    let c = |c| run.median(c, |s| s.connect);
    let diff = |a: Option<f64>, b: Option<f64>| a.zip(b).map_or("-".into(), |(a, b)| format!("{:+.0} µs", a - b));
    let _ = writeln!(md, "## Where the whole function's time goes (differences of this run's medians)\n");
    let _ = writeln!(md, "| phase | whole function |");
    let _ = writeln!(md, "|---|---:|");
    let _ = writeln!(md, "| being an LD_PRELOAD library at all (empty-preload − baseline) | {} |", diff(f(Config::EmptyPreload), f(Config::Baseline)));
    let _ = writeln!(
        md,
        "| warmpool's library on its own: load, init, hooks, exit; never asks the daemon (dummy-shim − empty-preload) | {} |",
        diff(f(Config::DummyShim), f(Config::EmptyPreload))
    );
    for pool in [Config::Reuse, Config::Prefetch, Config::ReuseLazy] {
        let n = pool.name();
        let _ = writeln!(md, "| {n}: the daemon's part, net ({n} − dummy-shim) | {} |", diff(f(pool), f(Config::DummyShim)));
        let _ = writeln!(md, "| {n}: of which connect() ({n} − dummy-shim; negative: the time it saves) | {} |", diff(c(pool), c(Config::DummyShim)));
        let cost = f(pool).zip(f(Config::DummyShim)).zip(c(Config::DummyShim).zip(c(pool))).map(|((p, d), (cd, cp))| p - d + cd - cp);
        let _ = writeln!(
            md,
            "| {n}: of which the link at load, identification, hand-out and give-back (the rest) | {} |",
            cost.map_or("-".into(), |v| format!("{v:+.0} µs"))
        );
    }
    for (shim, what) in
        [(Config::TrueShimLazy, "no link (`WARMPOOL_LAZY=1`)"), (Config::TrueShim, "link at load"), (Config::TrueShimPrefetch, "link, offers taken and given back")]
    {
        let _ = writeln!(
            md,
            "| `/bin/true`: library and {what} ({} − true-empty-preload) | {} |",
            shim.name(),
            diff(f(shim), f(Config::TrueEmptyPreload))
        );
    }
    let _ = writeln!(md);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_misses_are_counted_over_every_pool_row() {
        // As `pool-manager status` prints it: columns aligned with spaces.
        let status = "TENANT  DESTINATION      POLICY      IDLE  QUAR  LEASED  CONNECTING  WARM  REUSE  MISS  DISCARDED  CWND\n\
                      0:/     198.18.0.2:8080  warm(auto)  1     0     0       0           90    0      10    0          10\n\
                      \nLEARNED (kernel assist)  CWND\n1.2.3.4  10\n";
        assert_eq!(warm_miss_fraction(status), Some(0.1));
        assert_eq!(warm_miss_fraction("TENANT\tWARM\tREUSE\tMISS\n"), None);
    }
}
