//! Checks that need a process of their own: refusals of non-loopback
//! addresses inside a loopback-only network namespace, and proxy variables.

use super::*;

// --- isolated processes: a loopback-only network, proxy variables ---------------------------------

/// Set in a re-executed copy of this test binary to say which inner check to run.
const INNER: &str = "IRIS_IMAGES_INNER_TEST";

/// Re-runs the single test `name` of this binary in a child process with
/// `envs`, inside a fresh network namespace (only loopback, brought up) when
/// `netns`. `None` (the test is skipped: [`skip`]) when namespaces are
/// unavailable here.
fn rerun(name: &str, netns: bool, envs: &[(&str, String)]) -> Option<std::process::Output> {
    let exe = std::env::current_exe().expect("test binary");
    let mut command = if netns {
        let probe = std::process::Command::new("unshare")
            .args(["-n", "true"])
            .output();
        if !probe.is_ok_and(|o| o.status.success()) {
            return skip(
                "cannot create a network namespace here (`unshare -n` needs root or user namespaces)",
            );
        }
        let mut command = std::process::Command::new("unshare");
        command
            .args([
                "-n",
                "--",
                "sh",
                "-c",
                "ip link set lo up && exec \"$0\" \"$@\"",
            ])
            .arg(exe);
        command
    } else {
        std::process::Command::new(exe)
    };
    // Tests are named by their path below the crate: `images::name`.
    let module = module_path!().split_once("::").map_or("", |(_, rest)| rest);
    command
        .args([
            &format!("{module}::{name}"),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    for (key, value) in envs {
        command.env(key, value);
    }
    Some(command.output().expect("re-run the test binary"))
}

fn assert_child_passed(output: &std::process::Output, name: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "inner {name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn refusals_in_a_loopback_only_network_namespace() {
    const NAME: &str = "refusals_in_a_loopback_only_network_namespace";
    if std::env::var(INNER).as_deref() == Ok("netns") {
        return refusals_inside_the_namespace().await;
    }
    let Some(output) = rerun(NAME, true, &[(INNER, "netns".into())]) else {
        return;
    };
    assert_child_passed(&output, NAME);
}

/// Runs only inside a namespace whose one interface is loopback: were the
/// policy wrong, these addresses would be unreachable, not reached.
async fn refusals_inside_the_namespace() {
    // Belt and braces: refuse to run with a route off this machine.
    let outside = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect("10.0.0.1:80"),
    )
    .await;
    assert!(
        !matches!(outside, Ok(Ok(_))),
        "this namespace reaches beyond loopback"
    );

    let s = setup(INLINE, ALLOW_HOST).await;
    let secret = "?X-Amz-Signature=SECRET";
    for (target, reason) in [
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "metadata"),
        ("http://100.100.100.200/latest/meta-data/", "metadata"),
        ("http://0xa9fea9fe/", "metadata"),
        ("http://2852039166/", "metadata"),
        ("http://169.254.1.1/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://10.0.0.1/a.png", "private"),
        ("http://172.16.0.1/a.png", "private"),
        ("http://192.168.1.1/a.png", "private"),
        ("http://[fd12:3456::1]/a.png", "private"),
        ("http://100.64.0.1/a.png", "CGNAT"),
        ("http://0.0.0.0/a.png", "unspecified"),
        ("http://[::]/a.png", "unspecified"),
        ("http://224.0.0.1/a.png", "multicast"),
        ("http://[ff02::1]/a.png", "multicast"),
        ("http://255.255.255.255/a.png", "broadcast"),
        ("http://192.0.2.1/a.png", "documentation"),
        ("http://[2001:db8::1]/a.png", "documentation"),
        ("http://240.0.0.1/a.png", "reserved"),
        ("http://[::ffff:169.254.169.254]/", "metadata"),
        ("http://[::ffff:10.0.0.1]/", "private"),
        ("http://[::10.0.0.1]/", "private"),
        ("http://[64:ff9b::a9fe:a9fe]/", "metadata"),
        ("http://[64:ff9b::192.168.0.1]/", "private"),
        ("http://[2002:a9fe:a9fe::1]/", "metadata"),
        ("http://[2002:c0a8:0101::1]/", "private"),
        // Host agents and metadata outside 169.254.0.0/16, and their notations.
        (
            "http://168.63.129.16/machine?comp=goalstate",
            "Azure WireServer",
        ),
        ("http://2822734096/machine", "Azure WireServer"),
        ("http://0xa83f8110/machine", "Azure WireServer"),
        ("http://[::ffff:a83f:8110]/machine", "Azure WireServer"),
        ("http://169.254.170.2/v2/credentials/", "ECS"),
        ("http://169.254.170.23/v1/credentials", "Pod Identity"),
        ("http://[fd00:ec2::23]/v1/credentials", "Pod Identity"),
        ("http://[fd20:ce::254]/computeMetadata/v1/", "GCP"),
        ("http://192.0.0.192/latest/", "Oracle"),
        ("http://100.100.100.200./latest/", "Alibaba"),
        // By name, before any lookup.
        ("http://metadata.google.internal/computeMetadata/v1/", "GCP"),
        (
            "http://METADATA.google.internal./computeMetadata/v1/",
            "GCP",
        ),
        ("http://metadata/computeMetadata/v1/", "GCP"),
        ("http://instance-data/latest/meta-data/", "AWS"),
        (
            "https://kubernetes.default.svc/api",
            "Kubernetes API server",
        ),
        // Kubernetes service ranges, named.
        ("http://34.118.224.1/", "GKE"),
        ("http://10.96.0.1/", "Kubernetes"),
    ] {
        let url = format!("{target}{secret}");
        let message = s.refuse_one(&url, "image_url_forbidden").await;
        assert!(message.contains(reason), "{target}: {message}");
        assert!(!message.contains("SECRET"), "{message}");
    }

    // Redirects from the allowed host to refused addresses and names: the
    // message names the target, not the image host that redirected.
    let hop = s.host.addr.to_string();
    for (target, named) in [
        (
            "http://169.254.169.254/latest/meta-data/iam/",
            "http://169.254.169.254",
        ),
        ("http://10.0.0.1/a.png", "http://10.0.0.1"),
        ("http://[::ffff:a9fe:a9fe]/", "http://[::ffff:a9fe:a9fe]"),
        ("http://0xa9fea9fe/", "http://169.254.169.254"),
        (
            "http://168.63.129.16:32526/vmSettings",
            "http://168.63.129.16:32526",
        ),
        (
            "http://[fd00:ec2::254]/latest/api/token",
            "http://[fd00:ec2::254]",
        ),
        (
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://metadata.google.internal",
        ),
    ] {
        let url = s.host.url(&format!("/redirect?to={}", urlencode(target)));
        let message = s.refuse_one(&url, "image_url_forbidden").await;
        assert!(
            message.starts_with(&format!(
                "The image URL redirects to {named}, which is refused: "
            )),
            "{target}: {message}"
        );
        assert!(!message.contains(&hop), "{target}: {message}");
    }
    assert!(s.upstream.received().is_empty());

    // Networks allowed around metadata endpoints open the networks, never
    // the endpoints: CGNAT without Alibaba's, link-local without IMDS,
    // 168.63/16 without the WireServer, fd00::/8 without AWS's IPv6 IMDS.
    let s = setup(
        INLINE,
        r#"allowed_networks = ["127.0.0.2/32", "100.64.0.0/10", "169.254.0.0/16", "168.63.0.0/16", "fd00::/8", "2002::/16"]"#,
    )
    .await;
    for target in [
        "http://100.100.100.200/latest/meta-data/",
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.170.2/v2/credentials/",
        "http://168.63.129.16/machine",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[2002:a9fe:a9fe::1]/",
    ] {
        let message = refused(
            &s.iris,
            &body_with_images(&[(target, None)]),
            "image_url_forbidden",
            PARAM,
        )
        .await;
        assert!(message.contains("metadata"), "{target}: {message}");
    }
    // The rest of those networks is allowed: Iris tries to connect, and in
    // this namespace there is no route.
    for target in [
        "http://100.64.0.1/a.png",
        "http://169.254.1.1/a.png",
        "http://168.63.1.1/a.png",
    ] {
        refused(
            &s.iris,
            &body_with_images(&[(target, None)]),
            "image_fetch_failed",
            PARAM,
        )
        .await;
    }
}

#[tokio::test]
async fn proxy_environment_variables_are_ignored() {
    const NAME: &str = "proxy_environment_variables_are_ignored";
    if std::env::var(INNER).as_deref() == Ok("proxy") {
        return fetch_with_proxy_variables_set().await;
    }
    // A "proxy" that counts connections and answers each with a 502.
    let (proxy, connections) = raw_server(
        "127.0.0.1",
        b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
        false,
    )
    .await;
    let proxy_url = format!("http://{proxy}");
    let envs: Vec<(&str, String)> = [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .into_iter()
    .map(|k| (k, proxy_url.clone()))
    .chain([(INNER, "proxy".to_owned())])
    .collect();
    let output = tokio::task::spawn_blocking(move || rerun(NAME, false, &envs))
        .await
        .expect("join")
        .expect("a child process");
    assert_child_passed(&output, NAME);
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the control request went through the proxy"
    );
}

async fn fetch_with_proxy_variables_set() {
    let s = setup(INLINE, ALLOW_HOST).await;
    let png = encode(&chart(8, 8), ImageFormat::Png);
    s.host.add("a.png", "image/png", png.clone());
    let url = s.host.url("/files/a.png");

    // Control: a client that honours the variables does go to the proxy.
    let control = reqwest::Client::new()
        .get(&url)
        .send()
        .await
        .expect("via the proxy");
    assert_eq!(control.status(), 502, "the proxy variables are in effect");

    let (status, answer) = s.send_one(&url).await;
    assert_eq!(status, 200, "{answer}");
    assert!(s.inlined(1).1 == png);
    assert_eq!(s.host.hits("/files/a.png"), 1, "Iris fetched directly");
}
