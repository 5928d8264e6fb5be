//! Object storage servers on loopback for the bucket tests: s3s-fs (S3) and Azurite (Azure
//! Blob), installed by scripts/install-test-deps.sh under `/opt/redun-test-tools`
//! (`REDUN_TEST_TOOLS` overrides it). Each server keeps its data in a directory of the test,
//! listens on a free loopback port, and is stopped by its PID when the guard drops.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Daemon, run};

/// Which object server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    S3,
    Azure,
}

/// The bucket (S3) or container (Azure) every test uses.
pub const BUCKET: &str = "redun";
const S3_ACCESS: &str = "redun-test";
const S3_SECRET: &str = "redun-test-secret";
/// The emulator's account and well-known key (public, the same in every Azurite).
const AZ_ACCOUNT: &str = "devstoreaccount1";
const AZ_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn tools() -> PathBuf {
    std::env::var_os("REDUN_TEST_TOOLS")
        .map_or_else(|| PathBuf::from("/opt/redun-test-tools"), PathBuf::from)
}

/// A running object server.
pub struct ObjServer {
    pub server: Server,
    pub port: u16,
    /// Where the server keeps its data.
    pub data: PathBuf,
    log: PathBuf,
    daemon: Option<Daemon>,
}

impl ObjServer {
    /// Starts `server` with its data in `dir/NAME-data` and creates the bucket.
    pub fn start(server: Server, dir: &Path) -> ObjServer {
        let name = match server {
            Server::S3 => "s3s-fs",
            Server::Azure => "azurite",
        };
        let data = dir.join(format!("{name}-data"));
        std::fs::create_dir_all(&data).unwrap();
        if server == Server::S3 {
            std::fs::create_dir_all(data.join(BUCKET)).unwrap();
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = ObjServer {
            server,
            port,
            data,
            log: dir.join(format!("{name}.log")),
            daemon: None,
        };
        s.restart();
        if server == Server::Azure {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/az_container.py");
            run(std::process::Command::new("python3")
                .arg(script)
                .args([&port.to_string(), BUCKET]));
        }
        s
    }

    /// Starts the server again on the same port and data (after [`ObjServer::stop`]).
    pub fn restart(&mut self) {
        assert!(self.daemon.is_none(), "the object server is running");
        let port = self.port.to_string();
        let (program, args): (PathBuf, Vec<String>) = match self.server {
            Server::S3 => (
                tools().join("bin/s3s-fs"),
                vec![
                    "--host".into(),
                    "127.0.0.1".into(),
                    "--port".into(),
                    port,
                    "--access-key".into(),
                    S3_ACCESS.into(),
                    "--secret-key".into(),
                    S3_SECRET.into(),
                    self.data.display().to_string(),
                ],
            ),
            Server::Azure => (
                tools().join("azurite/node_modules/.bin/azurite-blob"),
                vec![
                    "--blobHost".into(),
                    "127.0.0.1".into(),
                    "--blobPort".into(),
                    port,
                    "--location".into(),
                    self.data.display().to_string(),
                    "--disableTelemetry".into(),
                    "--skipApiVersionCheck".into(),
                    "--loose".into(),
                    "--silent".into(),
                ],
            ),
        };
        assert!(
            program.exists(),
            "{} is not installed: run scripts/install-test-deps.sh",
            program.display()
        );
        let d = Daemon::start_program(&program, &args, &self.log);
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} did not listen on port {}: {}",
                program.display(),
                self.port,
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.daemon = Some(d);
    }

    /// Stops the server, keeping what it acknowledged: s3s-fs with SIGKILL (its objects
    /// are files), Azurite with SIGTERM (it keeps its metadata in memory and saves it every
    /// few seconds and when it stops; a SIGKILL loses recent objects and even containers,
    /// which no real server does).
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            match self.server {
                Server::S3 => d.kill9(),
                Server::Azure => d.stop(),
            }
        }
    }

    /// The URL of the bucket with `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        match self.server {
            Server::S3 => format!("s3://{BUCKET}/{prefix}"),
            Server::Azure => format!("az://{BUCKET}/{prefix}"),
        }
    }

    /// The options that reach the server.
    pub fn options(&self) -> redun_store::bucket::BucketOptions {
        let mut o = redun_store::bucket::BucketOptions {
            allow_http: true,
            ..Default::default()
        };
        match self.server {
            Server::S3 => {
                o.endpoint = Some(format!("http://127.0.0.1:{}", self.port));
                o.region = Some("us-east-1".into());
                o.access_key_id = Some(S3_ACCESS.into());
                o.secret_access_key = Some(S3_SECRET.into());
            }
            Server::Azure => {
                o.endpoint = Some(format!("http://127.0.0.1:{}/{AZ_ACCOUNT}", self.port));
                o.account = Some(AZ_ACCOUNT.into());
                o.access_key = Some(AZ_KEY.into());
            }
        }
        o
    }

    /// The `[bucket]` table that reaches the server (what [`ObjServer::options`] says).
    pub fn options_toml(&self) -> String {
        format!("[bucket]\n{}", toml::to_string(&self.options()).unwrap())
    }
}

impl Drop for ObjServer {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill9();
        }
    }
}
