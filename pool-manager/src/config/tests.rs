//! Unit tests of the configuration parser (kept beside config.rs to keep it short).

use super::*;

#[test]
fn embedded_default_matches_the_built_in_one() {
    let c = Config::from_toml(EMBEDDED_DEFAULT).unwrap();
    let d = Config::default();
    assert_eq!(c.auto, d.auto);
    assert_eq!(c.socket, d.socket);
    assert_eq!(c.socket_mode, d.socket_mode);
    assert_eq!(c.kernel, d.kernel);
    assert_eq!((c.allow_uids, c.allow_cgroups), (None, None));
    assert_eq!(c.metrics_tenant_labels, d.metrics_tenant_labels);
}

#[test]
fn allow_lists() {
    let c = Config::from_toml("allow_uids = [0, 1000]\nallow_cgroups = [\"/system.slice/fn.slice/\", \"/a\"]\n").unwrap();
    assert_eq!(c.allow_uids, Some(vec![0, 1000]));
    assert_eq!(c.allow_cgroups, Some(vec!["/system.slice/fn.slice".to_owned(), "/a".to_owned()]));
    assert!(c.admits(1000, "/system.slice/fn.slice").is_ok());
    assert!(c.admits(0, "/system.slice/fn.slice/f1.scope").is_ok());
    assert!(c.admits(0, "/a/b/c").is_ok());
    let e = c.admits(1001, "/a").unwrap_err();
    assert_eq!(e, "uid 1001 is not allowed by this pool manager's allow_uids");
    let e = c.admits(0, "/system.slice/fn.slice2").unwrap_err();
    assert_eq!(e, "cgroup /system.slice/fn.slice2 is not allowed by this pool manager's allow_cgroups");
    assert!(c.admits(0, "/ab").is_err());
    assert!(c.admits(0, "/a/../b").is_err(), "outside the daemon's cgroup namespace");
    assert!(c.admits(0, "").is_err());
    // Absent lists allow everything.
    assert!(Config::default().admits(12345, "/anything").is_ok());
    let only_uids = Config::from_toml("allow_uids = [7]\n").unwrap();
    assert!(only_uids.admits(7, "/x").is_ok() && only_uids.admits(8, "/x").is_err());
    let root = Config::from_toml("allow_cgroups = [\"/\"]\n").unwrap();
    assert!(root.admits(1, "/x/y").is_ok() && root.admits(1, "/").is_ok() && root.admits(1, "/../x").is_err());
}

#[test]
fn bad_allow_lists_name_the_problem() {
    for (text, want) in [
        ("allow_uids = [\"root\"]", "allow_uids: \"root\" is not a uid"),
        ("allow_uids = [-1]", "allow_uids: -1 is not a uid"),
        ("allow_uids = [4294967295]", "allow_uids: 4294967295 is not a uid"),
        ("allow_uids = [1.5]", "allow_uids: 1.5 is not a uid"),
        ("allow_uids = []", "allow_uids: an empty list"),
        ("allow_uids = 0", "allow_uids"),
        ("allow_cgroups = [\"system.slice\"]", "allow_cgroups: \"system.slice\" is not absolute"),
        ("allow_cgroups = [3]", "allow_cgroups: 3 is not a cgroup path"),
        ("allow_cgroups = [\"/a/../b\"]", "\"..\" component"),
        ("allow_cgroups = [\"/a//b\"]", "empty"),
        ("allow_cgroups = [\"/sys/fs/cgroup/fn.slice\"]", "under the cgroup2 mount"),
        ("allow_cgroups = []", "allow_cgroups: an empty list"),
    ] {
        let e = Config::from_toml(text).unwrap_err().to_string();
        assert!(e.contains(want), "{text}: {e}");
    }
}

#[test]
fn full_file_parses() {
    let c = Config::from_toml(
        r#"
        metrics = "127.0.0.1:9464"
        [auto]
        enabled = false
        [kernel]
        assist = "on"
        cgroups = ["/sys/fs/cgroup/functions"]
        [[pool]]
        destination = "127.0.0.1:6379"
        policy = "reuse"
        protocol = "redis"
        min_idle = 2
        quarantine = "2ms"
        probe = "redis-ping"
        "#,
    )
    .unwrap();
    assert!(!c.auto.enabled);
    assert_eq!(c.kernel.assist, AssistMode::On);
    assert_eq!(c.kernel.cgroups, vec![PathBuf::from("/sys/fs/cgroup/functions")]);
    let Lookup::Configured(s) = c.lookup(&"127.0.0.1:6379".parse().unwrap()) else { panic!() };
    assert_eq!((s.policy, s.min_idle, s.probe), (Policy::Reuse, 2, Probe::RedisPing));
    assert_eq!(s.quarantine, Duration::from_millis(2));
    assert!(matches!(c.lookup(&"[::ffff:127.0.0.1]:6379".parse().unwrap()), Lookup::Configured(_)));
    assert!(matches!(c.lookup(&"127.0.0.1:1".parse().unwrap()), Lookup::NotPooled));
}

#[test]
fn host_names_are_kept_and_may_resolve_later() {
    // (Only names /etc/hosts answers: a test sends no DNS query. A name that does not
    // resolve is tested with a daemon whose name service is a private /etc/hosts.)
    let c = Config::from_toml(
        "[[pool]]\ndestination = \"localhost:6379\"\npolicy = \"warm\"\n\
         [[pool]]\ndestination = \"127.0.0.1:81\"\npolicy = \"warm\"\n",
    )
    .unwrap();
    assert!(matches!(c.lookup(&"127.0.0.1:6379".parse().unwrap()), Lookup::Configured(_)));
    let names: Vec<&str> = c.names.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["localhost:6379"], "IP literals are not names");
    assert!(c.unresolved.is_empty());
    let (now, failed) = c.resolve_names();
    assert!(now.contains_key(&"127.0.0.1:6379".parse().unwrap()) && now.contains_key(&"[::ffff:127.0.0.1]:6379".parse().unwrap()));
    assert!(failed.is_empty());
    for bad in ["nohost", "host:port", ":80", "127.0.0.1:99999"] {
        let e = Config::from_toml(&format!("[[pool]]\ndestination = \"{bad}\"\npolicy = \"warm\"\n")).unwrap_err();
        assert!(e.to_string().contains(bad), "{bad}: {e}");
    }
    assert!(Config::from_toml("resolve_interval = \"1ms\"\n").is_err());
}

#[test]
fn bad_input_names_the_problem() {
    let e = Config::from_toml("[[pool]]\ndestination = \"127.0.0.1:1\"\npolicy = \"sometimes\"\n").unwrap_err();
    assert!(e.to_string().contains("sometimes"), "{e}");
    let e = Config::from_toml("[[pool]]\ndestination = \"127.0.0.1:1\"\n").unwrap_err();
    assert!(e.to_string().contains("policy is required"), "{e}");
    let e = Config::from_toml("bogus = 1\n").unwrap_err();
    assert!(e.to_string().contains("bogus"), "{e}");
    let e = Config::from_toml("[[pool]]\ndestination = \"127.0.0.1:1\"\npolicy = \"warm\"\nidle_timeout = \"soon\"\n").unwrap_err();
    assert!(e.to_string().contains("idle_timeout"), "{e}");
    let e = Config::from_toml("[[pool]]\ndestination = \"127.0.0.1:1\"\npolicy = \"warm\"\nmin_idle = 9\nmax_idle = 2\n").unwrap_err();
    assert!(e.to_string().contains("min_idle"), "{e}");
    let mut c = Config::default();
    assert!(matches!(c.add_pool_flag("127.0.0.1:80"), Err(ConfigError::PoolFlag(_))));
    assert!(matches!(c.add_pool_flag("127.0.0.1:80=maybe"), Err(ConfigError::PoolFlag(_))));
    assert!(matches!(c.add_pool_flag("127.0.0.1:80=prefetch"), Err(ConfigError::PoolFlag(_))));
    c.add_pool_flag("127.0.0.1:80=reuse:http").unwrap();
    c.add_pool_flag("127.0.0.1:81=warm+prefetch").unwrap();
    let p81 = c.pools.get(&"127.0.0.1:81".parse().unwrap()).unwrap();
    assert!(p81.prefetch && p81.policy == Policy::Warm);
    assert!(!c.pools.get(&"127.0.0.1:80".parse().unwrap()).unwrap().prefetch);
    let c =
        Config::from_toml("[[pool]]\ndestination = \"127.0.0.1:1\"\npolicy = \"reuse\"\nprotocol = \"http\"\nprefetch = true\n").unwrap();
    assert!(c.pools.get(&"127.0.0.1:1".parse().unwrap()).unwrap().prefetch);
    let e = Config::from_toml(
        "[[pool]]\ndestination = \"127.0.0.1:1\"\npolicy = \"reuse\"\nprotocol = \"redis\"\nprefetch = true\nprobe = \"redis-ping\"\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("prefetch cannot be combined with a probe"), "{e}");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("x", "250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("x", "1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("x", "10m").unwrap(), Duration::from_secs(600));
    assert_eq!(parse_duration("x", "100us").unwrap(), Duration::from_micros(100));
    assert!(parse_duration("x", "5 parsecs").is_err());
}

#[test]
fn reuse_pools_name_their_protocol() {
    let pool = |extra: &str| Config::from_toml(&format!("[[pool]]\ndestination = \"127.0.0.1:1\"\n{extra}"));
    let e = pool("policy = \"reuse\"\n").unwrap_err().to_string();
    assert!(e.contains("pool[0] (127.0.0.1:1)") && e.contains("\"http\", \"redis\" or \"unchecked\""), "{e}");
    let e = pool("policy = \"reuse\"\nprotocol = \"gopher\"\n").unwrap_err().to_string();
    assert!(e.contains("gopher"), "{e}");
    // Warm pools need none.
    let c = pool("policy = \"warm\"\n").unwrap();
    assert_eq!(c.pools.values().next().unwrap().protocol, None);
    let c = pool("policy = \"reuse\"\nprotocol = \"http\"\ncheck_path = \"/health\"\ncheck_host = \"api\"\ncheck_quiet = \"20ms\"\ncheck_timeout = \"2s\"\n").unwrap();
    let s = c.pools.values().next().unwrap();
    assert_eq!(s.protocol, Some(crate::proof::Protocol::Http));
    assert_eq!((s.check.path.as_str(), s.check.host.as_deref()), ("/health", Some("api")));
    assert_eq!((s.check.quiet, s.check.timeout), (Duration::from_millis(20), Duration::from_secs(2)));
    for (extra, want) in [
        ("check_path = \"health\"\n", "check_path"),
        ("check_path = \"/a b\"\n", "check_path"),
        ("check_host = \"a\\r\\nX: y\"\n", "check_host"),
        ("check_quiet = \"2s\"\n", "check_timeout must be longer"),
    ] {
        let e = pool(&format!("policy = \"reuse\"\nprotocol = \"http\"\n{extra}")).unwrap_err().to_string();
        assert!(e.contains(want), "{extra}: {e}");
    }
    // [auto] with reuse: the same rule.
    let e = Config::from_toml("[auto]\npolicy = \"reuse\"\n").unwrap_err().to_string();
    assert!(e.contains("auto") && e.contains("needs protocol"), "{e}");
    assert!(Config::from_toml("[auto]\npolicy = \"reuse\"\nprotocol = \"unchecked\"\n").is_ok());
    // Flags.
    let mut c = Config::default();
    let e = c.add_pool_flag("127.0.0.1:80=reuse").unwrap_err().to_string();
    assert!(e.contains("reuse:http, reuse:redis, reuse:unchecked"), "{e}");
    assert!(matches!(c.add_pool_flag("127.0.0.1:80=reuse:gopher"), Err(ConfigError::PoolFlag(_))));
    assert!(matches!(c.add_pool_flag("127.0.0.1:80=warm:http"), Err(ConfigError::PoolFlag(_))));
    c.add_pool_flag("127.0.0.1:6379=reuse:redis+prefetch").unwrap();
    let s = c.pools.get(&"127.0.0.1:6379".parse().unwrap()).unwrap();
    assert!(s.prefetch && s.protocol == Some(crate::proof::Protocol::Redis));
}

#[test]
fn netns_linger_is_read_and_defaults_to_a_few_seconds() {
    assert_eq!(Config::from_toml("netns_linger = \"250ms\"\n").unwrap().netns_linger, std::time::Duration::from_millis(250));
    assert_eq!(Config::default().netns_linger, crate::defaults::NETNS_LINGER);
    assert_eq!(Config::from_toml(EMBEDDED_DEFAULT).unwrap().netns_linger, crate::defaults::NETNS_LINGER);
    assert!(Config::from_toml("netns_linger = \"soon\"\n").is_err());
}

#[test]
fn tenant_sweep_and_the_auto_budgets_are_read_and_default() {
    let c = Config::from_toml("tenant_sweep = \"250ms\"\n[auto]\nmax_destinations = 3\nmax_pools = 10\n").unwrap();
    assert_eq!(c.tenant_sweep, std::time::Duration::from_millis(250));
    assert_eq!((c.auto.max_destinations, c.auto.max_pools), (3, 10));
    let d = Config::from_toml(EMBEDDED_DEFAULT).unwrap();
    assert_eq!(d.tenant_sweep, crate::defaults::TENANT_SWEEP);
    assert_eq!(Config::default().tenant_sweep, crate::defaults::TENANT_SWEEP);
    assert_eq!((d.auto.max_destinations, d.auto.max_pools), (crate::defaults::AUTO_MAX_DESTINATIONS, crate::defaults::AUTO_MAX_POOLS));
    assert!(Config::from_toml("tenant_sweep = \"1ms\"\n").is_err());
    assert!(Config::from_toml("tenant_sweep = \"often\"\n").is_err());
}
