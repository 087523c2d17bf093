//! The real binary: `callmeter check` on good and broken configs, `--help`, the demo.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn callmeter(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_callmeter"))
        .args(args)
        .env_remove("CALLMETER_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .expect("run callmeter")
}

const BASE: &str = r#"
[[listener]]
name = "main"
listen = "127.0.0.1:0"

[[org]]
id = "acme"
instance_url = "https://acme.my.salesforce.com"
"#;

/// Runs `callmeter check` on `toml` and returns (exit code, stderr).
fn check(toml: &str) -> (i32, String) {
    run("check", toml)
}

/// Runs `callmeter <command> --config FILE` on `toml`, where `GARBAGE` names a file beside it
/// that is not PEM, and returns (exit code, stderr).
fn run(command: &str, toml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").expect("write");
    let toml = toml.replace("GARBAGE", &garbage.display().to_string());
    let path = dir.path().join("callmeter.toml");
    std::fs::write(&path, toml).expect("write config");
    let out = callmeter(&[command, "--config", path.to_str().expect("utf-8 path")]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/callmeter.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_callmeter"))
        .args(["check", "--config", example.to_str().expect("path")])
        .env("CALLMETER_ETL_KEY", "example-key")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn config_mistakes_exit_2_and_name_the_key() {
    let cases: Vec<(String, &[&str])> = vec![
        (format!("{BASE}\nbogus_key = 1\n"), &["bogus_key"]),
        (BASE.replace("listen = \"127.0.0.1:0\"", "listen = 8080"), &["listen"]),
        (
            format!("{BASE}\n[[org]]\nid = \"acme\"\ninstance_url = \"https://b.my.salesforce.com\"\n"),
            &["acme", "org"],
        ),
        (
            format!("{BASE}\n[[integration]]\nid = \"a\"\norg = \"acmee\"\nmatch = {{ path_prefix = \"/a\" }}\n"),
            &["org", "acmee"],
        ),
        (
            format!(
                "{BASE}\n[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = {{ path_prefix = \"/x\" }}\n\
                 [[integration]]\nid = \"b\"\norg = \"acme\"\nmatch = {{ path_prefix = \"/x\" }}\n"
            ),
            &["match", "integration[0]"],
        ),
        (
            format!(
                "{BASE}\n[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = {{ key_env = \"CALLMETER_TEST_UNSET_VAR\" }}\n"
            ),
            &["key_env", "CALLMETER_TEST_UNSET_VAR"],
        ),
        (
            BASE.replace(
                "listen = \"127.0.0.1:0\"",
                "listen = \"127.0.0.1:0\"\ntls = { cert = \"/nonexistent/cert.pem\", key = \"/nonexistent/key.pem\" }",
            ),
            &["tls.cert", "/nonexistent/cert.pem"],
        ),
        (BASE.replace("https://acme", "http://acme"), &["instance_url", "allow_plain_http"]),
        (format!("{BASE}window = \"90s\"\n"), &["window"]),
        (format!("{BASE}reserve = \"140%\"\n"), &["reserve"]),
    ];
    for (toml, needles) in cases {
        let (code, stderr) = check(&toml);
        assert_eq!(code, 2, "exit code for:\n{toml}\nstderr: {stderr}");
        assert!(
            stderr.contains("callmeter.toml"),
            "names the file: {stderr}"
        );
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{stderr:?} should mention {needle:?} for:\n{toml}"
            );
        }
    }
}

/// Files that exist but are not what their key needs (not PEM, a key that does not fit its
/// certificate) fail `check` as they would fail `serve`, naming the file.
#[test]
fn check_reads_the_tls_files_as_serve_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let garbage = write("garbage.pem", "garbage\n");
    let one = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let cert = write("cert.pem", &one.cert.pem());
    let key = write("key.pem", &one.signing_key.serialize_pem());
    let other_key = write("other-key.pem", &other.signing_key.serialize_pem());
    let tls = |cert: &str, key: &str| {
        BASE.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:0\"\ntls = {{ cert = \"{cert}\", key = \"{key}\" }}"),
        )
    };
    let ca = |file: &str| format!("{BASE}upstream_ca = \"{file}\"\n");
    assert_eq!(
        check(&tls(&cert, &key)).0,
        0,
        "{}",
        check(&tls(&cert, &key)).1
    );
    assert_eq!(check(&ca(&cert)).0, 0);
    for (toml, needle) in [
        (tls(&garbage, &key), &garbage),
        (tls(&cert, &garbage), &garbage),
        (tls(&cert, &other_key), &other_key),
        (ca(&garbage), &garbage),
    ] {
        let (code, stderr) = check(&toml);
        assert_eq!(code, 2, "{toml}\n{stderr}");
        assert!(
            stderr.contains(needle.as_str()),
            "{stderr:?} names {needle}"
        );
    }
}

#[test]
fn errors_carry_the_line_where_the_parser_knows_it() {
    let (code, stderr) = check(&format!("{BASE}\n[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = {{ path_prefix = \"/a\" }}\nquota = true\n"));
    assert_eq!(code, 2);
    assert!(stderr.contains(":14"), "line of `quota`: {stderr}");
}

#[test]
fn help_explains_every_command() {
    let out = callmeter(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["serve", "check", "sim", "demo"] {
        assert!(text.contains(cmd), "{text}");
    }
}

#[test]
fn demo_runs_on_a_fresh_clone() {
    // Free ports for the demo's listeners.
    let port = || std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let (listen, admin) = (port(), port());
    let out = callmeter(&[
        "demo",
        "--once",
        "--calls",
        "20",
        "--listen",
        &listen.to_string(),
        "--admin",
        &admin.to_string(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "salesloft",
        "etl",
        "middleware",
        "/api/v1/usage",
        "/metrics",
    ] {
        assert!(stdout.contains(needle), "{stdout}");
    }
}

/// `check` reads `smtp.ca` as it reads `upstream_ca`: a file without a certificate (a key, a
/// DER file) was accepted by both `check` and `serve`, and threshold emails then failed their
/// TLS handshake with the private-CA relay exactly when a threshold was crossed.
#[test]
fn check_refuses_an_smtp_ca_without_a_certificate() {
    let toml = format!(
        "{BASE}\n[smtp]\nhost = \"smtp.example.com\"\nfrom = \"callmeter <callmeter@example.com>\"\nca = \"GARBAGE\"\n"
    );
    let (code, stderr) = check(&toml);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("smtp.ca"), "{stderr}");
}

/// A file the config names that is not usable is a config mistake for `serve` too: exit code 2
/// and the config file and key in the message, as `check` says it (`serve` exited 1).
#[test]
fn serve_exits_2_for_a_file_mistake_check_reports() {
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[store]\npath = \":memory:\"\n{BASE}upstream_ca = \"GARBAGE\"\n"
    );
    let (check_code, check_err) = run("check", &toml);
    assert_eq!(check_code, 2, "{check_err}");
    let (serve_code, serve_err) = run("serve", &toml);
    assert_eq!(serve_code, 2, "{serve_err}");
    assert!(
        serve_err.contains("upstream_ca") && serve_err.contains("callmeter.toml"),
        "{serve_err}"
    );
}

/// `check` prints the warnings `serve` logs (on stderr, before "ok"; exit code 0). Among them:
/// with two orgs a listener without `org` takes no org's unmatched traffic, so adding a second
/// org silently turned acme's `unmatched = "unattributed"` into 403 CALLMETER_UNMATCHED while
/// `check` said "ok".
#[test]
fn check_flags_an_unmatched_setting_no_listener_can_reach() {
    let toml = format!(
        "{BASE}unmatched = \"unattributed\"\n\
         [[org]]\nid = \"beta\"\ninstance_url = \"https://beta.my.salesforce.com\"\n"
    );
    let (code, stderr) = check(&toml);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.lines().any(|l| l.starts_with("warning: ")
            && l.contains("\"acme\"")
            && l.contains("unmatched = \"unattributed\"")),
        "{stderr}"
    );
    // Named by the listener, it applies: no such warning.
    let named = toml.replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\norg = \"acme\"\n",
    );
    let (code, stderr) = check(&named);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("unattributed"), "{stderr}");
}
