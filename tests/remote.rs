//! The remote registry against a real S3 server on loopback (moto's, started by
//! scripts/s3-server.sh, which installs it on first use): round trips, only missing bytes
//! sent, tags by compare-and-swap, the fault cases of the local store (concurrent pushers,
//! pushers killed at random points, a corrupted object), locks between gc and writers, and
//! credentials kept out of what is stored.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod common;

use common::assert_ok;

/// A secret no stored object may contain.
const SECRET: &str = "mmx-test-secret-7f3a91";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// `host:port` of the test process's S3 server, started on first use. The server watches this
/// process and stops when it exits.
fn server() -> &'static str {
    static SERVER: OnceLock<String> = OnceLock::new();
    SERVER.get_or_init(|| {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Never waited on: the script stops the server and itself when this process exits.
        #[allow(clippy::zombie_processes)]
        Command::new("bash")
            .arg(root().join("scripts/s3-server.sh"))
            .arg(port.to_string())
            .arg(std::process::id().to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("scripts/s3-server.sh starts");
        let address = format!("127.0.0.1:{port}");
        // The first start installs moto into a virtual environment (about a minute).
        let deadline = Instant::now() + Duration::from_secs(600);
        while Instant::now() < deadline {
            if TcpStream::connect(&address).is_ok() && http("GET", &address, "/", &[], b"").0 == 200
            {
                return address;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "the S3 server on {address} did not answer within 10 minutes (scripts/s3-server.sh)"
        );
    })
}

/// One plain HTTP request (moto accepts unsigned ones): status and body.
fn http(
    method: &str,
    address: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let Ok(mut stream) = TcpStream::connect(address) else {
        return (0, Vec::new());
    };
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    if stream.write_all(request.as_bytes()).is_err() || stream.write_all(body).is_err() {
        return (0, Vec::new());
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let start = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |p| p + 4);
    (status, response[start..].to_vec())
}

/// A fresh bucket, `s3://<bucket>/team` for its registry.
fn bucket(name: &str) -> String {
    let (status, body) = http("PUT", server(), &format!("/{name}"), &[], b"");
    assert_eq!(
        status,
        200,
        "creating bucket {name}: {}",
        String::from_utf8_lossy(&body)
    );
    format!("s3://{name}/team")
}

/// A signed client of one bucket (moto refuses anonymous reads of private objects), for
/// looking at and tampering with what mmx stored.
struct Objects {
    store: object_store::aws::AmazonS3,
    runtime: tokio::runtime::Runtime,
}

impl Objects {
    fn of(bucket: &str) -> Objects {
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(format!("http://{}", server()))
            .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id("mmx-test")
            .with_secret_access_key(SECRET)
            .build()
            .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Objects { store, runtime }
    }

    fn keys(&self) -> Vec<String> {
        use futures_util::TryStreamExt;
        use object_store::ObjectStore;
        self.runtime
            .block_on(self.store.list(None).try_collect::<Vec<_>>())
            .unwrap()
            .into_iter()
            .map(|m| m.location.to_string())
            .collect()
    }

    fn get(&self, key: &str) -> Vec<u8> {
        use object_store::ObjectStoreExt;
        self.runtime.block_on(async {
            let got = self.store.get(&key.into()).await.unwrap();
            got.bytes().await.unwrap().to_vec()
        })
    }

    /// Puts `bytes` at `key`: unconditionally, or (`create`) only if absent; whether it wrote.
    fn put(&self, key: &str, bytes: &[u8], create: bool) -> bool {
        use object_store::{ObjectStore, PutMode, PutOptions};
        let mode = if create {
            PutMode::Create
        } else {
            PutMode::Overwrite
        };
        let options = PutOptions {
            mode,
            ..PutOptions::default()
        };
        let key_path = object_store::path::Path::from(key);
        let put = self
            .store
            .put_opts(&key_path, bytes.to_vec().into(), options);
        match self.runtime.block_on(put) {
            Ok(_) => true,
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => false,
            Err(e) => panic!("put {key}: {e}"),
        }
    }
}

/// The S3 client's environment: the server, a region and test credentials.
fn s3_env(command: &mut Command) -> &mut Command {
    command
        .env_remove("MMX_REGISTRY")
        .env("AWS_ENDPOINT_URL", format!("http://{}", server()))
        .env("AWS_ACCESS_KEY_ID", "mmx-test")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
        .env("MMX_REMOTE_LOCK_LIFETIME", "3s")
}

/// `mmx args` in `cwd` against the test server.
fn mmx(args: &[&str], cwd: &Path) -> Output {
    s3_env(
        Command::new(env!("CARGO_BIN_EXE_mmx"))
            .current_dir(cwd)
            .args(args),
    )
    .output()
    .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    assert_ok(out);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn example(path: &str) -> String {
    root().join("examples").join(path).display().to_string()
}

/// A copy of the example adapter `specialty` whose tensors all differ from it (new blobs),
/// different for every `seed`.
fn adapter_variant(dir: &Path, specialty: &str, seed: u8) -> PathBuf {
    let out = dir.join(format!("{specialty}-{seed}"));
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(example(&format!("adapters/{specialty}"))).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), out.join(entry.file_name())).unwrap();
    }
    let weights = out.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for i in (header..bytes.len()).step_by(64) {
        bytes[i] ^= seed.wrapping_mul(2).wrapping_add(1);
    }
    std::fs::write(&weights, bytes).unwrap();
    out
}

/// A local registry in `w/local` holding the tiny base as base:v1 and the example adapters
/// `specialties` as `<specialty>:v1` on it.
fn local_registry(w: &Path, specialties: &[&str]) -> String {
    let local = w.join("local").display().to_string();
    let publish = |args: &[&str]| {
        let mut all = vec!["publish"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--registry", &local]);
        assert_ok(&mmx(&all, w));
    };
    publish(&[&example("tiny-med-base"), "base:v1", "--kind", "base"]);
    for s in specialties {
        let tag = format!("{s}:v1");
        publish(&[
            &example(&format!("adapters/{s}")),
            &tag,
            "--base",
            "base:v1",
            "--specialty",
            s,
        ]);
    }
    local
}

/// The blobs a manifest of the local registry at `local` names, and the manifest itself, with
/// their sizes on disk.
fn closure_blobs(local: &str, tag: &str, w: &Path) -> BTreeMap<String, u64> {
    let shown = json(&mmx(&["show", tag, "--json", "--registry", local], w));
    let digest = mmx(&["ls", "--json", "--registry", local], w);
    let listing = json(&digest);
    let manifest = listing
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["reference"] == tag)
        .unwrap()["manifest"]
        .as_str()
        .unwrap()
        .to_string();
    let size = |d: &str| {
        let hex = d.strip_prefix("blake3:").unwrap();
        std::fs::metadata(
            Path::new(local)
                .join("blobs/blake3")
                .join(&hex[..2])
                .join(&hex[2..]),
        )
        .unwrap()
        .len()
    };
    let mut out = BTreeMap::new();
    out.insert(manifest.clone(), size(&manifest));
    for file in shown["files"].as_array().unwrap() {
        let mut digests: Vec<&str> = file["blob"].as_str().into_iter().collect();
        digests.extend(file["header"].as_str());
        if let Some(tensors) = file["tensors"].as_array() {
            digests.extend(tensors.iter().map(|t| t["blob"].as_str().unwrap()));
        }
        for d in digests {
            out.insert(d.to_string(), size(d));
        }
    }
    out
}

fn push(tag: &str, remote: &str, local: &str, w: &Path) -> serde_json::Value {
    json(&mmx(
        &["push", tag, "--to", remote, "--json", "--registry", local],
        w,
    ))
}

#[test]
fn a_second_conditional_create_is_refused_by_the_server() {
    // The canary: a server that silently overwrites would make every tag test pass vacuously.
    bucket("canary");
    let objects = Objects::of("canary");
    assert!(objects.put("key", b"first", true));
    assert!(
        !objects.put("key", b"second", true),
        "a second conditional create was accepted"
    );
    assert_eq!(objects.get("key"), b"first");
}

#[test]
fn push_and_pull_round_trip_and_send_only_what_the_remote_lacks() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let local = local_registry(w, &["cardiology", "radiology"]);
    let remote = bucket("roundtrip");

    let base = closure_blobs(&local, "base:v1", w);
    let cardiology = closure_blobs(&local, "cardiology:v1", w);
    let radiology = closure_blobs(&local, "radiology:v1", w);
    let first = push("cardiology:v1", &remote, &local, w);
    let mut expected = base.clone();
    expected.extend(cardiology.clone());
    let expected_bytes: u64 = expected.values().sum();
    assert_eq!(first["sent"], expected.len());
    assert_eq!(first["bytes_sent"], expected_bytes);
    assert_eq!(first["bytes"], expected_bytes);
    assert_eq!(first["manifests"], 2);
    assert_eq!(
        first["tags"],
        serde_json::json!(["cardiology:v1", "base:v1"])
    );

    // The same push again sends nothing.
    let again = push("cardiology:v1", &remote, &local, w);
    assert_eq!(again["sent"], 0);
    assert_eq!(again["bytes_sent"], 0);

    // An adapter on the same base sends only its own blobs.
    let second = push("radiology:v1", &remote, &local, w);
    let own: u64 = radiology
        .iter()
        .filter(|(d, _)| !expected.contains_key(*d))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(second["bytes_sent"], own);
    assert!(own < second["bytes"].as_u64().unwrap() / 4, "{second}");
    eprintln!(
        "first push {expected_bytes} bytes; re-push 0; shared-base push {own} of {}",
        second["bytes"]
    );

    // The remote answers every registry command.
    let listing = json(&mmx(&["ls", "--json", "--registry", &remote], w));
    let tags: Vec<&str> = listing
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["reference"].as_str().unwrap())
        .collect();
    assert_eq!(tags, ["base:v1", "cardiology:v1", "radiology:v1"]);
    assert_ok(&mmx(&["verify", "--read-data", "--registry", &remote], w));
    assert_ok(&mmx(&["log", "radiology:v1", "--registry", &remote], w));

    // Pulled into a fresh registry and written out, byte for byte.
    let cache = w.join("cache").display().to_string();
    let out = w.join("pulled");
    let pulled = json(&mmx(
        &[
            "pull",
            "radiology:v1",
            "--from",
            &remote,
            "-o",
            out.to_str().unwrap(),
            "--json",
            "--registry",
            &cache,
        ],
        w,
    ));
    assert_eq!(pulled["sent"], pulled["blobs"]);
    for entry in std::fs::read_dir(example("adapters/radiology")).unwrap() {
        let entry = entry.unwrap();
        assert!(
            std::fs::read(entry.path()).unwrap()
                == std::fs::read(out.join(entry.file_name())).unwrap(),
            "{:?} differs",
            entry.file_name()
        );
    }
    let cached = json(&mmx(&["ls", "--json", "--registry", &cache], w));
    assert_eq!(
        cached.as_array().unwrap().len(),
        2,
        "the base's tag came along: {cached}"
    );

    // No stored object holds the credentials.
    let objects = Objects::of("roundtrip");
    let stored = objects.keys();
    assert!(stored.len() > 10, "{stored:?}");
    for key in stored {
        let body = objects.get(&key);
        assert!(
            !String::from_utf8_lossy(&body).contains(SECRET),
            "{key} holds the secret"
        );
    }
}

#[test]
fn a_remote_tag_that_points_elsewhere_moves_only_when_forced() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let remote = bucket("tags");
    let (a, b) = (w.join("a"), w.join("b"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    assert_ok(&mmx(
        &[
            "publish",
            &example("adapters/cardiology"),
            "x:v1",
            "--registry",
            a,
        ],
        w,
    ));
    assert_ok(&mmx(
        &[
            "publish",
            &example("adapters/radiology"),
            "x:v1",
            "--registry",
            b,
        ],
        w,
    ));
    push("x:v1", &remote, a, w);
    let refused = mmx(&["push", "x:v1", "--to", &remote, "--registry", b], w);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("already points at"),
        "{}",
        stderr(&refused)
    );
    assert_ok(&mmx(
        &["push", "x:v1", "--to", &remote, "--force", "--registry", b],
        w,
    ));
    let there = mmx(&["show", "x:v1", "--json", "--registry", &remote], w);
    assert!(String::from_utf8_lossy(&there.stdout).contains("lora_B"));
}

#[test]
fn concurrent_pushers_to_one_tag_have_one_winner_and_the_rest_fail_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let remote = bucket("race");
    let locals: Vec<String> = (0..8u8)
        .map(|i| {
            let local = w.join(format!("local{i}")).display().to_string();
            let dir = adapter_variant(w, "cardiology", i);
            assert_ok(&mmx(
                &[
                    "publish",
                    dir.to_str().unwrap(),
                    "shared:v1",
                    "--registry",
                    &local,
                ],
                w,
            ));
            local
        })
        .collect();
    let children: Vec<_> = locals
        .iter()
        .map(|local| {
            s3_env(Command::new(env!("CARGO_BIN_EXE_mmx")).current_dir(w))
                .args([
                    "push",
                    "shared:v1",
                    "--to",
                    &remote,
                    "--quiet",
                    "--registry",
                    local,
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let winners: Vec<usize> = (0..8).filter(|i| outputs[*i].status.success()).collect();
    assert_eq!(
        winners.len(),
        1,
        "{:?}",
        outputs.iter().map(stderr).collect::<Vec<_>>()
    );
    for (i, out) in outputs.iter().enumerate() {
        if !out.status.success() {
            let text = stderr(out);
            assert!(
                text.contains("already points at") || text.contains("moved"),
                "pusher {i}: {text}"
            );
        }
    }
    // The tag names the winner's manifest, and every blob of it is there.
    let ours = json(&mmx(
        &["ls", "--json", "--registry", &locals[winners[0]]],
        w,
    ));
    let theirs = json(&mmx(&["ls", "--json", "--registry", &remote], w));
    assert_eq!(ours[0]["manifest"], theirs[0]["manifest"]);
    assert_ok(&mmx(&["verify", "--read-data", "--registry", &remote], w));
}

#[test]
fn eight_concurrent_pushers_of_adapters_on_one_base_all_land() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let local = local_registry(w, &[]);
    let specialties = ["cardiology", "radiology", "dermatology", "pathology"];
    for i in 0..8u8 {
        let dir = adapter_variant(w, specialties[usize::from(i) % 4], i);
        let tag = format!("expert{i}:v1");
        assert_ok(&mmx(
            &[
                "publish",
                dir.to_str().unwrap(),
                &tag,
                "--base",
                "base:v1",
                "--registry",
                &local,
            ],
            w,
        ));
    }
    let remote = bucket("concurrent");
    let children: Vec<_> = (0..8)
        .map(|i| {
            s3_env(Command::new(env!("CARGO_BIN_EXE_mmx")).current_dir(w))
                .args([
                    "push",
                    &format!("expert{i}:v1"),
                    "--to",
                    &remote,
                    "--quiet",
                    "--registry",
                    &local,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "pusher {i}: {}", stderr(&out));
    }
    let listing = json(&mmx(&["ls", "--json", "--registry", &remote], w));
    assert_eq!(listing.as_array().unwrap().len(), 9);
    let report = json(&mmx(
        &[
            "verify",
            "--read-data",
            "--grace",
            "0s",
            "--json",
            "--registry",
            &remote,
        ],
        w,
    ));
    assert_eq!(report["orphaned"].as_array().unwrap().len(), 0, "{report}");
    assert_eq!(report["missing"].as_array().unwrap().len(), 0, "{report}");
}

#[test]
fn pushers_killed_at_random_points_leave_a_verifiable_remote_and_resume() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let local = local_registry(w, &[]);
    let remote = bucket("killed");
    // How long one push of new content takes here: kills land uniformly within it.
    let calibration = adapter_variant(w, "pathology", 255);
    assert_ok(&mmx(
        &[
            "publish",
            calibration.to_str().unwrap(),
            "calibration:v1",
            "--registry",
            &local,
        ],
        w,
    ));
    let start = Instant::now();
    push("calibration:v1", &remote, &local, w);
    let span = start.elapsed().as_micros() as u64;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    let trials = 16u8;
    let (mut finished, mut resumed_part_way) = (0, 0);
    for trial in 0..trials {
        let dir = adapter_variant(w, "dermatology", trial);
        let tag = format!("t{trial}:v1");
        assert_ok(&mmx(
            &[
                "publish",
                dir.to_str().unwrap(),
                &tag,
                "--base",
                "base:v1",
                "--registry",
                &local,
            ],
            w,
        ));
        let mut child = s3_env(Command::new(env!("CARGO_BIN_EXE_mmx")).current_dir(w))
            .args([
                "push",
                &tag,
                "--to",
                &remote,
                "--quiet",
                "--registry",
                &local,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(next() % span.max(1)));
        let _ = child.kill(); // SIGKILL
        finished += usize::from(child.wait().unwrap().success());
        let verify = mmx(&["verify", "--registry", &remote], w);
        assert_eq!(
            verify.status.code(),
            Some(0),
            "trial {trial}: {}",
            String::from_utf8_lossy(&verify.stdout)
        );
        // The tag is absent or whole.
        let cache = w.join(format!("cache{trial}")).display().to_string();
        let out = w.join(format!("pulled{trial}"));
        let pull = mmx(
            &[
                "pull",
                &tag,
                "--from",
                &remote,
                "-o",
                out.to_str().unwrap(),
                "--quiet",
                "--registry",
                &cache,
            ],
            w,
        );
        if !pull.status.success() {
            assert!(
                stderr(&pull).contains("no tag"),
                "trial {trial}: {}",
                stderr(&pull)
            );
            // Pushed again, it sends only what the killed push had not.
            let resumed = push(&tag, &remote, &local, w);
            let sent = resumed["bytes_sent"].as_u64().unwrap();
            let all = resumed["bytes"].as_u64().unwrap();
            resumed_part_way += usize::from(sent < all);
        }
    }
    eprintln!(
        "{trials} pushers killed at random points within {span} µs: {finished} had finished, {resumed_part_way} of the rest resumed sending less than all"
    );
    assert!(
        usize::from(trials) - finished >= 3,
        "pushers were killed mid-way"
    );
    // The killed pushers' lock objects expire (3 s here), then gc sweeps what they left.
    std::thread::sleep(Duration::from_secs(4));
    assert_ok(&mmx(&["gc", "--grace", "0s", "--registry", &remote], w));
    let report = json(&mmx(
        &[
            "verify",
            "--read-data",
            "--grace",
            "0s",
            "--json",
            "--registry",
            &remote,
        ],
        w,
    ));
    assert_eq!(report["orphaned"].as_array().unwrap().len(), 0, "{report}");
    assert_eq!(
        report["unreferenced_recent"].as_array().unwrap().len(),
        0,
        "{report}"
    );
    assert_eq!(report["tags"], u64::from(trials) + 2);
}

#[test]
fn a_corrupted_object_is_caught_on_read_and_nothing_is_stored() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let local = local_registry(w, &["cardiology"]);
    let remote = bucket("corrupt");
    push("cardiology:v1", &remote, &local, w);
    let shown = json(&mmx(
        &["show", "cardiology:v1", "--json", "--registry", &local],
        w,
    ));
    let tensor = shown["files"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|f| f["tensors"].as_array())
        .unwrap()[0]["blob"]
        .as_str()
        .unwrap()
        .to_string();
    let hex = tensor.strip_prefix("blake3:").unwrap();
    let key = format!("team/blobs/blake3/{}/{}", &hex[..2], &hex[2..]);
    let objects = Objects::of("corrupt");
    let mut bytes = objects.get(&key);
    bytes[0] ^= 1;
    assert!(objects.put(&key, &bytes, false));

    let cache = w.join("cache").display().to_string();
    let pull = mmx(
        &[
            "pull",
            "cardiology:v1",
            "--from",
            &remote,
            "--quiet",
            "--registry",
            &cache,
        ],
        w,
    );
    assert_eq!(pull.status.code(), Some(2));
    assert!(
        stderr(&pull).contains(&tensor) && stderr(&pull).contains("corrupt"),
        "{}",
        stderr(&pull)
    );
    let cached = json(&mmx(&["ls", "--json", "--registry", &cache], w));
    assert_eq!(cached, serde_json::json!([]), "no tag came along");
    let verify = mmx(&["verify", "--read-data", "--registry", &remote], w);
    assert_eq!(verify.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&verify.stdout).contains(&tensor));
}

#[test]
fn gc_and_writers_exclude_each_other_through_lock_objects() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let local = local_registry(w, &["cardiology"]);
    let remote = bucket("locks");
    push("base:v1", &remote, &local, w);
    // A live writer's lock object: gc waits.
    let objects = Objects::of("locks");
    assert!(objects.put("team/locks/writer-other", b"x", false));
    let gc = mmx(&["gc", "--registry", &remote], w);
    assert_eq!(gc.status.code(), Some(2));
    assert!(stderr(&gc).contains("writer"), "{}", stderr(&gc));
    // Once it is stale (a writer that died), gc runs.
    std::thread::sleep(Duration::from_secs(4));
    assert_ok(&mmx(&["gc", "--registry", &remote], w));
    // A live gc's lock object: writers wait.
    assert!(objects.put("team/locks/gc", b"x", false));
    let pushed = mmx(
        &[
            "push",
            "cardiology:v1",
            "--to",
            &remote,
            "--registry",
            &local,
        ],
        w,
    );
    assert_eq!(pushed.status.code(), Some(2));
    assert!(
        stderr(&pushed).contains("gc is running"),
        "{}",
        stderr(&pushed)
    );
}

#[test]
fn an_unreachable_remote_is_a_clear_error_after_bounded_retries() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let local = local_registry(w, &[]);
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = s3_env(Command::new(env!("CARGO_BIN_EXE_mmx")).current_dir(w))
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{closed}"))
        .args([
            "push",
            "base:v1",
            "--to",
            "s3://nowhere/team",
            "--registry",
            &local,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("s3://nowhere/team"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn remotes_are_named_in_the_registry_marker() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let local = local_registry(w, &["cardiology"]);
    bucket("named");
    let marker = Path::new(&local).join("mmx-registry.toml");
    let mut text = std::fs::read_to_string(&marker).unwrap();
    text.push_str(&format!(
        "\n[remotes.team]\nurl = \"s3://named/shared\"\nendpoint = \"http://{}\"\nregion = \"us-east-1\"\n",
        server()
    ));
    std::fs::write(&marker, text).unwrap();
    let out = s3_env(Command::new(env!("CARGO_BIN_EXE_mmx")).current_dir(w))
        .env_remove("AWS_ENDPOINT_URL")
        .args([
            "push",
            "cardiology:v1",
            "--to",
            "team",
            "--registry",
            &local,
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("to s3://named/shared"));
    assert!(Objects::of("named")
        .keys()
        .iter()
        .any(|k| k == "shared/refs/cardiology/v1"));
    let unknown = mmx(
        &[
            "push",
            "cardiology:v1",
            "--to",
            "elsewhere",
            "--registry",
            &local,
        ],
        w,
    );
    assert!(
        stderr(&unknown).contains("elsewhere"),
        "{}",
        stderr(&unknown)
    );
}
