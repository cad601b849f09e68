use majordome_bench::reqrep::*;
use std::time::Duration;

#[test]
#[ignore]
fn manual() {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let options = ReqRepOptions {
        broker: std::env::var("B_BROKER").ok(),
        majordome_exe: env("B_EXE", "/work/main/target/release/majordome").into(),
        clients: env("B_C", "2").parse().unwrap(),
        workers: env("B_W", "2").parse().unwrap(),
        requests: env("B_N", "20000").parse().unwrap(),
        size: 100,
        window: env("B_K", "4").parse().unwrap(),
        service: "echo".into(),
        baseline_proxy: env("B_P", "1") == "1",
        idle_services: env("B_M", "0").parse().unwrap(),
        runs: env("B_R", "3").parse().unwrap(),
        idle_heartbeat: Duration::from_millis(env("B_HB", "1000").parse().unwrap()),
        broker_args: env("B_ARGS", "").split_whitespace().map(String::from).collect(),
    };
    let mut out = std::io::stdout();
    let report = run(&options, &mut out);
    println!("{report:?}");
    report.unwrap();
}
