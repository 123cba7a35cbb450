//! Wiring: buses → publisher → link, and the ordered shutdown.
//!
//! Shutdown order (SIGTERM/SIGINT or the caller's token): bus tasks stop polling and exit →
//! the publisher drains what they produced and exits, closing the link's inbound queue → the
//! link delivers what it holds (bounded by its flush timeout), publishes `offline` and
//! disconnects.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::link::{self, LinkReport, LinkSettings, OutMessage};
use crate::modbus::{self, BusEvent, BusHandle};
use crate::model::Config;
use crate::publish::{self, Input, Tagged};

/// What a run ended with.
#[derive(Debug)]
pub struct RunReport {
    pub link: LinkReport,
}

/// A request to reload the configuration from `path` (SIGHUP).
pub struct Reload {
    pub path: std::path::PathBuf,
    pub requests: mpsc::Receiver<()>,
}

/// A running bus task and what it was started from.
struct RunningBus {
    /// The configuration it was started from (the forwarder holds it anyway) and its index:
    /// compared with a reloaded one through `bus_def`, built only then.
    config: Arc<Config>,
    bus: usize,
    handle: BusHandle,
    cancel: CancellationToken,
    tracker: TaskTracker,
    forwarder: tokio::task::JoinHandle<()>,
}

/// A bus and its devices as configured, independent of their positions in the file.
#[derive(PartialEq)]
struct BusDef {
    bus: crate::model::Bus,
    devices: Vec<crate::model::Device>,
}

fn bus_def(config: &Config, b: usize) -> BusDef {
    BusDef {
        bus: config.buses[b].clone(),
        devices: config
            .devices
            .iter()
            .filter(|d| d.bus == b)
            .map(|d| crate::model::Device {
                bus: 0,
                ..d.clone()
            })
            .collect(),
    }
}

fn spawn_bus(
    config: &Arc<Config>,
    generation: u64,
    b: usize,
    tagged: &mpsc::Sender<Input>,
    discoveries: &mpsc::UnboundedSender<Discovery>,
    stop: &CancellationToken,
) -> Option<RunningBus> {
    let bus = &config.buses[b];
    let devices: Vec<_> = config
        .devices
        .iter()
        .enumerate()
        .filter(|(_, d)| d.bus == b)
        .map(|(i, d)| (i, d.clone()))
        .collect();
    if devices.is_empty() {
        tracing::warn!(bus = %bus.name, "bus has no devices; not opened");
        return None;
    }
    let spawn = match bus.kind {
        crate::model::BusKind::Lines(_) => crate::lines::spawn,
        _ => modbus::spawn,
    };
    let (events_tx, mut events_rx) = mpsc::channel::<BusEvent>(64);
    let cancel = stop.child_token();
    let tracker = TaskTracker::new();
    let handle = spawn(bus, devices, events_tx, cancel.clone(), &tracker);
    tracker.close();
    let started_from = config.clone();
    let (config, tagged, discoveries) = (config.clone(), tagged.clone(), discoveries.clone());
    // Ends when the bus task ends and drops its sender.
    let forwarder = tokio::spawn(async move {
        while let Some(event) = events_rx.recv().await {
            if let BusEvent::Discovered { device, found } = event {
                let d = &config.devices[device];
                let key = (
                    d.name.clone(),
                    config.buses[d.bus].name.clone(),
                    i64::from(d.unit),
                );
                // Unbounded, so the forwarder never waits on the loop that may be stopping
                // this bus; a bus sends at most one discovery per device.
                let _ = discoveries.send((key, found));
                continue;
            }
            let t = Tagged {
                config: config.clone(),
                generation,
                event,
            };
            if tagged.send(Input::Bus(t)).await.is_err() {
                break;
            }
        }
    });
    Some(RunningBus {
        config: started_from,
        bus: b,
        handle,
        cancel,
        tracker,
        forwarder,
    })
}

/// A SunSpec discovery of a bus, for the application: the device's key in
/// [`crate::config::Discoveries`] and what was found.
type Discovery = ((String, String, i64), Arc<crate::sunspec::Discovered>);

/// Stops one bus task and waits until it and its forwarder are gone.
async fn stop_bus(r: RunningBus) {
    r.cancel.cancel();
    r.tracker.wait().await;
    let _ = r.forwarder.await;
}

/// The new configuration if it can replace the running one, else `None` with the reason
/// logged (the running configuration stays).
fn load_for_reload(
    path: &std::path::Path,
    running: &Config,
    discovered: &crate::config::Discoveries,
) -> Option<(Config, String)> {
    let loaded = crate::config::read_text(path).and_then(|text| {
        let library = crate::config::profile::Library::for_config(path);
        crate::config::parse_discovered(&text, &path.display().to_string(), &library, discovered)
            .map(|l| (l.config, text))
    });
    match loaded {
        Err(errors) => {
            tracing::error!("reload refused, keeping the running configuration:\n{errors}");
            None
        }
        Ok((new, _)) if needs_restart(&new, running) => {
            tracing::error!(
                "reload refused: the gateway, mqtt, store, sparkplug or http section changed (or, in Sparkplug mode, the devices: their births would change), which needs a restart (systemctl restart fieldbridge); keeping the running configuration"
            );
            None
        }
        Ok(loaded) => Some(loaded),
    }
}

/// Whether `new` changes what a reload cannot: the gateway, mqtt, store, sparkplug or http
/// section (e.g. a password file edited on disk), or in Sparkplug mode the devices.
fn needs_restart(new: &Config, running: &Config) -> bool {
    new.gateway != running.gateway
        || new.mqtt != running.mqtt
        || new.store != running.store
        || new.sparkplug != running.sparkplug
        || new.http != running.http
        || (new.sparkplug.is_some() && new.devices != running.devices)
}

/// Where commands go now: the current router's queue, and the configuration it routes by.
type RouterInput = (mpsc::Sender<crate::link::InMessage>, Arc<Config>);

/// Tasks that are replaced as a whole on a reload: the command router, the stats publisher
/// and the systemd supervisor.
struct Sidecars {
    router_cancel: CancellationToken,
    router: tokio::task::JoinHandle<crate::command::router::Memory>,
    stats_cancel: CancellationToken,
    health_retire: CancellationToken,
}

/// What the sidecars' figures come from, kept across reloads.
struct Observed {
    link: Arc<link::LinkStats>,
    store: Option<Arc<crate::store::StoreStats>>,
    commands: Arc<crate::command::CommandStats>,
    live: Option<Arc<crate::observe::Live>>,
    started: crate::observe::Started,
    ready: Arc<std::sync::atomic::AtomicBool>,
    /// The current sources, for the HTTP endpoint.
    current: tokio::sync::watch::Sender<Arc<crate::observe::Sources>>,
}

impl Observed {
    /// The sources of `config` running on `handles`, made current.
    fn sources(&self, config: &Arc<Config>, handles: &[BusHandle]) -> Arc<crate::observe::Sources> {
        let sources = Arc::new(crate::observe::Sources::new(
            config.clone(),
            handles.to_vec(),
            self.link.clone(),
            self.store.clone(),
            self.commands.clone(),
            self.live.clone(),
            self.started,
            self.ready.clone(),
        ));
        self.current.send_replace(sources.clone());
        sources
    }
}

impl Sidecars {
    #[allow(clippy::too_many_arguments)]
    fn start(
        config: &Arc<Config>,
        handles: &[BusHandle],
        router_input: &tokio::sync::watch::Sender<RouterInput>,
        publisher: &mpsc::Sender<Input>,
        link_sender: &mpsc::Sender<OutMessage>,
        observed: &Observed,
        memory: crate::command::router::Memory,
        stop: &CancellationToken,
    ) -> Sidecars {
        let sources = observed.sources(config, handles);
        let router_cancel = stop.child_token();
        let (tx, rx) = mpsc::channel(crate::command::QUEUE);
        router_input.send_replace((tx, config.clone()));
        let router = crate::command::router::spawn(
            config.clone(),
            handles,
            rx,
            publisher.clone(),
            observed.commands.clone(),
            memory,
            router_cancel.clone(),
        );
        let stats_cancel = stop.child_token();
        // In Sparkplug mode the figures are node metrics (NDATA) instead.
        if let Some(every) = config
            .gateway
            .stats_interval
            .filter(|_| config.sparkplug.is_none())
        {
            tokio::spawn(publish::stats::run(
                sources.clone(),
                every,
                link_sender.clone(),
                stats_cancel.clone(),
            ));
        }
        // READY=1 now, STATUS= and WATCHDOG=1 while tasks progress, STOPPING=1 on `stop`.
        let health_retire = CancellationToken::new();
        crate::health::spawn(sources, stop.clone(), health_retire.clone());
        Sidecars {
            router_cancel,
            router,
            stats_cancel,
            health_retire,
        }
    }

    /// Stops the router and the stats task. On a reload the supervisor is retired silently
    /// (its successor sends `READY=1`); on shutdown it sees the stop and sends `STOPPING=1`.
    ///
    /// On a reload the supervisor is left running, watching the old buses while they stop
    /// (each stops within its own stall limit), and is retired by the caller right before
    /// its successor starts: the watchdog is pinged all through the reload.
    async fn stop(self) -> (crate::command::router::Memory, CancellationToken) {
        self.router_cancel.cancel();
        self.stats_cancel.cancel();
        let memory = self.router.await.unwrap_or_default();
        (memory, self.health_retire)
    }
}

/// Runs the gateway until `cancel` fires. Errors only for setup failures (TLS files).
pub async fn run(config: Config, cancel: CancellationToken) -> anyhow::Result<RunReport> {
    run_with_reload(config, cancel, None).await
}

/// As [`run`], reloading the configuration on each request of `reload`: buses whose
/// definition (the bus and its devices) did not change keep running untouched; changed and
/// removed ones are stopped, new ones started; the MQTT link and the store are kept. A file
/// that does not validate, or that changes the gateway, mqtt or store sections, is refused
/// with an error and the running configuration stays.
pub async fn run_with_reload(
    config: Config,
    cancel: CancellationToken,
    mut reload: Option<Reload>,
) -> anyhow::Result<RunReport> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (encoder, announcer) = publish::encoding(&config);
    let mut settings = LinkSettings::from_config(&config.mqtt);
    settings.subscriptions = crate::command::subscriptions(&config);
    settings.announcer = Some(announcer);
    // Births wanted again within a session: a Sparkplug rebirth, Home Assistant's birth or a
    // reload (the discovery configs).
    let rebirths = (config.sparkplug.is_some() || config.homeassistant.is_some())
        .then(|| Arc::new(tokio::sync::Notify::new()));
    settings.rebirths = rebirths.clone();
    let (commands_tx, mut commands_rx) = mpsc::channel(crate::command::QUEUE);
    let settings = settings.with_store(&config.store);
    let outbox = open_store(&config.store);
    let store_stats = outbox.as_ref().map(|o| o.store.stats.clone());
    let link = link::spawn(&config.mqtt, settings, outbox, Some(commands_tx), 1024)?;
    tracing::info!(
        gateway = %config.gateway.id,
        broker = %format!("{}:{}", config.mqtt.host, config.mqtt.port),
        buses = config.buses.len(),
        devices = config.devices.len(),
        "fieldbridge started"
    );

    let started = crate::observe::Started::now();
    let command_stats = Arc::new(crate::command::CommandStats::default());
    let (tagged_tx, tagged_rx) = mpsc::channel::<Input>(256);
    let figures = config
        .sparkplug
        .is_some()
        .then(|| figures(&link.stats, &store_stats, &command_stats));
    // The last values, for the status page: kept only while the endpoint is on.
    let live = config
        .http
        .is_some()
        .then(|| Arc::new(crate::observe::Live::default()));
    let publisher = tokio::spawn(publish::run(
        tagged_rx,
        encoder,
        figures,
        rebirths,
        live.clone(),
        link.sender.clone(),
    ));
    // Commands go to whichever router is current (one per configuration). Never blocking:
    // a command that finds the router's queue full is answered `busy` (within a budget)
    // instead of being dropped silently after the broker has its PUBACK.
    let (router_input, router_current) =
        tokio::sync::watch::channel((mpsc::channel(1).0, Arc::new(config.clone())));
    {
        let stats = command_stats.clone();
        // Weak: the publisher waits for every sender to go before it stops (and the link
        // waits for the publisher).
        let publisher = tagged_tx.downgrade();
        tokio::spawn(async move {
            let mut budget = crate::command::RateLimiter::new(
                crate::model::Rate {
                    count: crate::command::REFUSAL_BUDGET,
                    per: Duration::from_secs(1),
                },
                Instant::now(),
            );
            while let Some(msg) = commands_rx.recv().await {
                let (router, config) = router_current.borrow().clone();
                let Err(e) = router.try_send(msg) else {
                    continue;
                };
                let msg = match e {
                    mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
                };
                stats
                    .dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if !budget.allow(Instant::now()) {
                    continue;
                }
                tracing::warn!(topic = %crate::command::log_topic(&msg.topic), "command queue full (or router being replaced): answered busy, not executed");
                let Some(publisher) = publisher.upgrade() else {
                    continue;
                };
                if let Some(busy) = crate::command::router::overloaded(&config, &msg) {
                    let _ = publisher.try_send(Input::Result(busy));
                }
            }
        });
    }

    // SunSpec discoveries: a bus hands one over, the configuration is validated again with
    // it (from the running configuration's text) and the bus restarted, as a reload would.
    let (discoveries_tx, mut discoveries_rx) = mpsc::unbounded_channel::<Discovery>();
    let mut discovered = crate::config::Discoveries::new();
    let mut source: Option<(std::path::PathBuf, String)> = None;
    if config.devices.iter().any(|d| d.sunspec.is_some()) {
        match &reload {
            Some(r) => match crate::config::read_text(&r.path) {
                Ok(text) => source = Some((r.path.clone(), text)),
                Err(e) => tracing::error!("cannot read the configuration again for SunSpec discovery:\n{e}"),
            },
            None => tracing::warn!("SunSpec discovery needs the gateway started from a configuration file: `sunspec: auto` devices are not read"),
        }
    }
    let mut config = Arc::new(config);
    let mut generation = 1u64;
    let mut running: Vec<RunningBus> = (0..config.buses.len())
        .filter_map(|b| spawn_bus(&config, generation, b, &tagged_tx, &discoveries_tx, &cancel))
        .collect();
    let handles = |running: &[RunningBus]| -> Vec<BusHandle> {
        running.iter().map(|r| r.handle.clone()).collect()
    };
    let (current, current_rx) =
        tokio::sync::watch::channel(Arc::new(crate::observe::Sources::new(
            config.clone(),
            Vec::new(),
            link.stats.clone(),
            store_stats.clone(),
            command_stats.clone(),
            live.clone(),
            started,
            Arc::default(),
        )));
    let observed = Observed {
        link: link.stats.clone(),
        store: store_stats.clone(),
        commands: command_stats.clone(),
        live,
        started,
        ready: Arc::default(),
        current,
    };
    let mut sidecars = Sidecars::start(
        &config,
        &handles(&running),
        &router_input,
        &tagged_tx,
        &link.sender,
        &observed,
        crate::command::router::Memory::default(),
        &cancel,
    );
    let http_stop = CancellationToken::new();
    if let Some(settings) = &config.http {
        if let Err(e) = crate::http::spawn(settings, current_rx, http_stop.clone()).await {
            // The gateway's work goes on without its window.
            tracing::error!(listen = %settings.listen, error = %e, "cannot open the http endpoint: running without /metrics and the status page");
        }
    }

    loop {
        let requested = async {
            match reload.as_mut() {
                Some(r) => r.requests.recv().await,
                None => std::future::pending().await,
            }
        };
        let new = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(()) = requested => {
                let path = reload.as_ref().expect("reload requested").path.clone();
                let Some((new, text)) = load_for_reload(&path, &config, &discovered) else { continue };
                if let Some(n) = crate::notify::Notifier::from_env() {
                    let _ = n.send("RELOADING=1");
                }
                // Always the text now running: a discovery arriving later is applied to it,
                // never to the configuration this reload replaced.
                source = Some((path, text));
                let wanted = crate::config::discovery_keys(&new);
                discovered.retain(|k, _| wanted.contains(k));
                new
            }
            Some((key, found)) = discoveries_rx.recv() => {
                // Those that came together make one reload (one restart of each bus).
                let mut arrived = vec![(key, found)];
                while let Ok(more) = discoveries_rx.try_recv() {
                    arrived.push(more);
                }
                let device = arrived.iter().map(|((name, _, _), _)| name.as_str()).collect::<Vec<_>>().join(", ");
                let wanted = crate::config::discovery_keys(&config);
                let before = discovered.clone();
                for (key, found) in arrived {
                    // From a bus of a configuration a reload has replaced: not this device.
                    if wanted.contains(&key) {
                        discovered.insert(key, found);
                    }
                }
                if discovered == before {
                    continue;
                }
                let Some((path, text)) = &source else { continue };
                let library = crate::config::profile::Library::for_config(path);
                match crate::config::parse_discovered(text, &path.display().to_string(), &library, &discovered) {
                    Ok(loaded) if needs_restart(&loaded.config, &config) => {
                        // The kept text is the running one, so a file it names (a password
                        // or profile file) changed on disk since: that needs a restart.
                        tracing::error!(device = %device, "SunSpec points found, but a file the configuration reads changed the gateway, mqtt, store, sparkplug or http section since it was loaded; they are applied at the next restart (systemctl restart fieldbridge)");
                        continue;
                    }
                    Ok(loaded) => {
                        let file = path.display().to_string();
                        for w in &loaded.warnings {
                            tracing::warn!("{}", crate::config::warning_line(&file, w));
                        }
                        tracing::info!(device = %device, "SunSpec points added: restarting the device's bus");
                        loaded.config
                    }
                    Err(errors) => {
                        tracing::error!(device = %device, "the SunSpec points found do not fit the configuration; the device is not read:\n{errors}");
                        // Kept, it would make every later reload fail too: back to what runs.
                        discovered = before;
                        continue;
                    }
                }
            }
        };
        generation += 1;
        let new = Arc::new(new);
        let (memory, old_supervisor) = sidecars.stop().await;
        let (mut kept, mut stopped) = (Vec::new(), 0usize);
        // All at once: the reload takes as long as the slowest bus takes to stop.
        let mut stopping = tokio::task::JoinSet::new();
        for r in running.drain(..) {
            let same = new
                .buses
                .iter()
                .position(|b| b.name == r.config.buses[r.bus].name)
                .is_some_and(|b| bus_def(&new, b) == bus_def(&r.config, r.bus));
            if same {
                kept.push(r);
            } else {
                stopping.spawn(stop_bus(r));
                stopped += 1;
            }
        }
        stopping.join_all().await;
        old_supervisor.cancel();
        let kept_names: Vec<String> = kept
            .iter()
            .map(|r| r.config.buses[r.bus].name.clone())
            .collect();
        let started: Vec<RunningBus> = (0..new.buses.len())
            .filter(|&b| !kept_names.contains(&new.buses[b].name))
            .filter_map(|b| spawn_bus(&new, generation, b, &tagged_tx, &discoveries_tx, &cancel))
            .collect();
        tracing::info!(
            kept = kept.len(),
            stopped,
            started = started.len(),
            "configuration reloaded"
        );
        running = kept;
        running.extend(started);
        // Command topics the new configuration adds are subscribed to at once.
        link.subscriptions.send_if_modified(|filters| {
            let wanted = crate::command::subscriptions(&new);
            let changed = *filters != wanted;
            *filters = wanted;
            changed
        });
        config = new;
        let _ = tagged_tx.send(Input::Reconfigured(config.clone())).await;
        sidecars = Sidecars::start(
            &config,
            &handles(&running),
            &router_input,
            &tagged_tx,
            &link.sender,
            &observed,
            memory,
            &cancel,
        );
    }

    tracing::info!("shutting down: stopping polls");
    let last = observed.sources(&config, &handles(&running));
    for r in running {
        stop_bus(r).await;
    }
    http_stop.cancel();
    let _ = sidecars.stop().await;
    drop(tagged_tx);
    drop(router_input);
    let _ = publisher.await;
    // Every sender of the link's queue is gone now (publisher, router, stats).
    drop(link.sender);
    // The link bounds its own flush (5 s) and goodbye (2 s); this bound only guards against a
    // sender kept alive by mistake, which would otherwise hang the stop until SIGKILL.
    let report = match tokio::time::timeout(Duration::from_secs(15), link.done).await {
        Ok(report) => report?,
        Err(_) => anyhow::bail!("the MQTT link did not stop within 15 s"),
    };
    for b in &last.snapshot().buses {
        let failures = |kind: &str| {
            b.failures
                .iter()
                .find(|(k, _)| *k == kind)
                .map_or(0, |f| f.1)
        };
        tracing::info!(
            bus = %b.name,
            polls = b.polls,
            failed = b.failed_polls,
            exceptions = failures("exception"),
            timeouts = failures("timeout"),
            skipped_ticks = b.skipped_ticks,
            resets = b.resets,
            busy_s = b.busy_seconds,
            "bus summary"
        );
    }
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(f64::NAN);
    tracing::info!(
        delivered = report.delivered,
        dropped = report.dropped,
        undelivered = report.undelivered,
        latency_p50_ms = ms(report.latency.quantile(0.5)),
        latency_p99_ms = ms(report.latency.quantile(0.99)),
        "link summary"
    );
    Ok(RunReport { link: report })
}

/// The gateway's figures for the encodings that publish them (Sparkplug node metrics).
fn figures(
    link: &Arc<link::LinkStats>,
    store: &Option<Arc<crate::store::StoreStats>>,
    commands: &Arc<crate::command::CommandStats>,
) -> publish::Figures {
    use std::sync::atomic::Ordering::Relaxed;
    let (link, store, commands) = (link.clone(), store.clone(), commands.clone());
    Box::new(move || publish::sparkplug::NodeFigures {
        backlog: link.backlog.load(Relaxed),
        dropped: link.dropped.load(Relaxed) + store.as_ref().map_or(0, |s| s.dropped.load(Relaxed)),
        devices_online: 0,
        commands_refused: commands.refused.load(Relaxed),
        commands_executed: commands.executed.load(Relaxed),
    })
}

/// Opens the outbox; without one the gateway still runs, on its memory queue, loudly.
fn open_store(config: &crate::model::Store) -> Option<link::Outbox> {
    let path = config.path.as_ref()?;
    match crate::store::open(config, path) {
        Ok((store, events)) => {
            tracing::info!(
                store = %path.display(),
                backlog = store.stats.backlog.load(std::sync::atomic::Ordering::Relaxed),
                "store opened"
            );
            Some(link::Outbox { store, events })
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                "cannot open the store: running WITHOUT store-and-forward (memory queue only); fix store.path or its permissions"
            );
            None
        }
    }
}
