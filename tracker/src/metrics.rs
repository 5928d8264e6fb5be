//! Prometheus metrics of a daemon on an HTTP listener of its own (`metrics.listen` in its
//! section of the config file, off by default): `GET /metrics` answers the OpenMetrics text
//! that the `prometheus-client` crate encodes. Each scrape builds its families from the
//! daemon's state at that moment ([`Scrape`]); histograms that must accumulate (NBD request
//! latency) live in the daemon and are added to the scrape.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, warn};
use prometheus_client::encoding::EncodeMetric;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label pairs of one series.
pub type Labels = Vec<(String, String)>;

/// `[("volume", name)]`.
pub fn volume(name: &str) -> Labels {
    vec![("volume".to_string(), name.to_string())]
}

/// `[("group", name)]`.
pub fn group(name: &str) -> Labels {
    vec![("group".to_string(), name.to_string())]
}

type GaugeFamily = Family<Labels, Gauge<f64, AtomicU64>>;
/// Histograms by label set, made with [`latency_histogram`].
pub type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;
type CounterFamily = Family<Labels, Counter>;
type SecondsFamily = Family<Labels, Counter<f64, AtomicU64>>;

/// A histogram of request durations in seconds: 10 µs to about 10 s.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-5, 4.0, 11))
}

/// The family `name` of `families`, registered with `help` the first time it is asked for.
fn family<'a, M>(
    registry: &mut Registry,
    families: &'a mut BTreeMap<&'static str, Family<Labels, M>>,
    name: &'static str,
    help: &str,
) -> &'a Family<Labels, M>
where
    M: Default + EncodeMetric + TypedMetric + std::fmt::Debug + Send + Sync + 'static,
{
    families.entry(name).or_insert_with(|| {
        let f = Family::default();
        registry.register(name, help, f.clone());
        f
    })
}

/// The metrics of one scrape.
#[derive(Debug, Default)]
pub struct Scrape {
    registry: Registry,
    gauges: BTreeMap<&'static str, GaugeFamily>,
    counters: BTreeMap<&'static str, CounterFamily>,
    seconds: BTreeMap<&'static str, SecondsFamily>,
}

impl Scrape {
    pub fn new() -> Scrape {
        Scrape::default()
    }

    /// Sets gauge `name{labels}` to `v`.
    pub fn gauge(&mut self, name: &'static str, help: &str, labels: Labels, v: f64) {
        family(&mut self.registry, &mut self.gauges, name, help)
            .get_or_create(&labels)
            .set(v);
    }

    /// Sets counter `name{labels}` (exposed as `name_total`) to `v`.
    pub fn counter(&mut self, name: &'static str, help: &str, labels: Labels, v: u64) {
        family(&mut self.registry, &mut self.counters, name, help)
            .get_or_create(&labels)
            .inc_by(v);
    }

    /// Sets counter `name{labels}` (exposed as `name_total`, a number of seconds) to `us`
    /// microseconds.
    pub fn counter_seconds(&mut self, name: &'static str, help: &str, labels: Labels, us: u64) {
        family(&mut self.registry, &mut self.seconds, name, help)
            .get_or_create(&labels)
            .inc_by(us as f64 / 1e6);
    }

    /// A state set: `name{labels, state}` is 1 for `current` and 0 for the other `states`.
    pub fn state(
        &mut self,
        name: &'static str,
        help: &str,
        labels: &Labels,
        states: &[&str],
        current: &str,
    ) {
        for s in states {
            let mut l = labels.clone();
            l.push(("state".into(), (*s).into()));
            self.gauge(name, help, l, f64::from(u8::from(*s == current)));
        }
    }

    /// Adds a family of histograms the daemon keeps.
    pub fn histograms(&mut self, name: &'static str, help: &str, family: HistogramFamily) {
        self.registry.register(name, help, family);
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            warn!("metrics: cannot encode: {e}");
        }
        out
    }
}

/// The Prometheus text format (0.0.4) of OpenMetrics text, for scrapers that do not ask for
/// OpenMetrics: the same samples, counter families named with their `_total` suffix in
/// `# HELP`/`# TYPE`, no `# EOF`.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for l in openmetrics.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| l.strip_prefix(p).map(|rest| (*p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{p}{name}_total {tail}"));
                } else {
                    out.push_str(l);
                }
            }
            None => out.push_str(l),
        }
        out.push('\n');
    }
    out
}

/// What answers a scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// A running metrics listener; dropping it stops it.
#[derive(Debug)]
pub struct MetricsServer {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `listen` (`HOST:PORT`) and answers `GET /metrics` with `render()`.
    pub fn bind(listen: &str, render: Render) -> io::Result<MetricsServer> {
        let l = TcpListener::bind(listen).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot serve metrics on {listen}: {e} (metrics.listen)"),
            )
        })?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("metrics".into())
                .spawn(move || accept(&l, &render, &stop))?
        };
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on (with the port chosen when `:0` was asked).
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept(l: &TcpListener, render: &Render, stop: &AtomicBool) {
    // Scrapes are rare and small: one at a time, on this thread.
    crate::service::accept_until(l, stop, "metrics", |s, peer| {
        if let Err(e) = answer(s, render) {
            debug!("metrics: {peer}: {e}");
        }
    });
}

/// One HTTP/1.x exchange: the request line and headers are read, one response written.
fn answer(s: TcpStream, render: &Render) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(io::Read::take(&s, 16 * 1024));
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut header = String::new();
    let mut openmetrics = false;
    loop {
        header.clear();
        if r.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
        let h = header.to_ascii_lowercase();
        if h.starts_with("accept:") && h.contains("application/openmetrics-text") {
            openmetrics = true;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") if openmetrics => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(),
        ),
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            prometheus_text(&render()),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "redun serves its metrics at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics\n".to_string(),
        ),
    };
    let mut w = &s;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_scrape_encodes_gauges_counters_and_histograms() {
        let mut s = Scrape::new();
        s.gauge("redun_lag_bytes", "Lag.", volume("db"), 42.0);
        s.gauge("redun_lag_bytes", "Lag.", volume("web"), 7.0);
        s.counter("redun_retries", "Retries.", volume("db"), 3);
        s.counter_seconds("redun_waited_seconds", "Waits.", volume("db"), 1_500_000);
        let h: HistogramFamily = Family::new_with_constructor(latency_histogram);
        h.get_or_create(&volume("db")).observe(0.001);
        s.histograms("redun_nbd_request_duration_seconds", "Latency.", h);
        let text = s.render();
        assert!(
            text.contains("redun_lag_bytes{volume=\"db\"} 42.0"),
            "{text}"
        );
        assert!(
            text.contains("redun_retries_total{volume=\"db\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("redun_waited_seconds_total{volume=\"db\"} 1.5"),
            "{text}"
        );
        assert!(
            text.contains("redun_nbd_request_duration_seconds_count{volume=\"db\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        let plain = prometheus_text(&text);
        assert!(
            plain.contains("# TYPE redun_retries_total counter"),
            "{plain}"
        );
        assert!(
            plain.contains("# HELP redun_retries_total Retries."),
            "{plain}"
        );
        assert!(plain.contains("# TYPE redun_lag_bytes gauge"), "{plain}");
        assert!(!plain.contains("# EOF"), "{plain}");
    }

    #[test]
    fn the_listener_answers_get_metrics_and_nothing_else() {
        let m =
            MetricsServer::bind("127.0.0.1:0", Arc::new(|| "x 1\n# EOF\n".to_string())).unwrap();
        let get = |req: &str| {
            let mut c = TcpStream::connect(m.addr()).unwrap();
            c.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            out
        };
        let ok =
            get("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n\r\n");
        assert!(
            ok.starts_with("HTTP/1.1 200 OK") && ok.ends_with("x 1\n# EOF\n"),
            "{ok}"
        );
        let plain = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            plain.contains("version=0.0.4") && plain.ends_with("x 1\n"),
            "{plain}"
        );
        assert!(get("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    }
}
