//! The one validation pass: parsed files in, [`Settings`] and an immutable [`Policy`] out.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use ipnet::IpNet;
use rustc_hash::FxHashMap;

use super::types::{ConfigFile, LimitDef, RuleDef, VendorDef, S};
use super::{
    parse_duration, parse_size, AdminSettings, AuditSettings, AuthSettings, ConfigError,
    LimitStoreSettings, OnFull, PacMode, Parsed, ProxySettings, Settings, Sources,
    UpstreamSettings,
};
use crate::inspect::dlp::{DlpError, Scanner};
use crate::limits::{KeyPart, LimitKind, LimitSpec, OnStoreError};
use crate::policy::path::PathPattern;
use crate::policy::target::{self, Host};
use crate::policy::{
    Action, Catalog, DefaultVerdict, Endpoint, HostPattern, Inspection, InterceptLists, Mode,
    Policy, Rule, RuleIndex, Vendor,
};

const MAX_GROUPS: usize = 64;

pub(super) fn compile(src: &Sources, parsed: Parsed) -> Result<(Settings, Policy), ConfigError> {
    for (file, inc) in &parsed.includes {
        only_policy_sections(src, *file, inc)?;
    }
    let main = &parsed.main;
    let files = parsed
        .includes
        .iter()
        .map(|(f, c)| (*f, c))
        .chain(std::iter::once((0, main)));

    let mut catalog = Catalog::default();
    let mut rule_defs: Vec<(usize, &S<RuleDef>)> = Vec::new();
    for (file, cfg) in files {
        for v in &cfg.vendor {
            add_vendor(src, file, v, &mut catalog)?;
        }
        rule_defs.extend(cfg.rule.iter().map(|r| (file, r)));
    }

    let (group_names, user_groups) = groups(src, main)?;
    let named = named_limits(src, main)?;
    let scanner = dlp_scanner(src, main)?;
    let mut rules = Vec::with_capacity(rule_defs.len());
    let mut index = RuleIndex {
        by_vendor: vec![Vec::new(); catalog.vendors().len()],
        by_vendor_pathless: vec![Vec::new(); catalog.vendors().len()],
        ..RuleIndex::default()
    };
    let mut seen_ids: FxHashMap<String, ()> = FxHashMap::default();
    for (file, def) in rule_defs {
        let n = rules.len() as u32;
        let id = def.get_ref().id.get_ref();
        if seen_ids.insert(id.clone(), ()).is_some() {
            return Err(src.error(
                src.at(file, &def.get_ref().id),
                format!("duplicate rule id {id:?}"),
            ));
        }
        let rule = compile_rule(
            src,
            file,
            def.get_ref(),
            &catalog,
            &group_names,
            &named,
            &scanner,
            n,
            &mut index,
        )?;
        rules.push(rule);
    }

    let (default_action, default_reason) = match &main.defaults {
        Some(d) => {
            let d = d.get_ref();
            let action = match &d.action {
                // A default has no limits to apply: "limit" would refuse nothing and be
                // counted as limiting everything.
                Some(a) if a.get_ref() == "limit" => {
                    return Err(src.error(
                        src.at(0, a),
                        "[defaults] action must be allow, audit or block (a limit needs a rule with limits)",
                    ))
                }
                Some(a) => parse_action(src, 0, a)?,
                None => Action::Allow,
            };
            (action, d.reason.clone())
        }
        None => (Action::Allow, None),
    };

    let proxy = main.proxy.as_ref().map(|p| p.get_ref());
    let connect_ports = match proxy.and_then(|p| p.connect_ports.as_ref()) {
        Some(ports) if ports.get_ref().is_empty() || ports.get_ref().contains(&0) => {
            return Err(src.error(src.at(0, ports), "connect_ports must list ports 1-65535"))
        }
        Some(ports) => ports.get_ref().clone(),
        None => vec![443],
    };

    let policy = Policy {
        rules,
        index,
        default: DefaultVerdict {
            action: default_action,
            reason: default_reason
                .unwrap_or_else(|| "no rule matched; default action".to_string())
                .into(),
        },
        user_groups,
        group_names,
        connect_ports,
        intercept: intercept_lists(src, main, &catalog)?,
        inspection: None,
        catalog,
    };
    let inspection = inspection(src, main, &policy, scanner)?;
    let policy = Policy {
        inspection,
        ..policy
    };
    Ok((settings(src, main)?, policy))
}

fn only_policy_sections(src: &Sources, file: usize, c: &ConfigFile) -> Result<(), ConfigError> {
    let misplaced = [
        c.proxy.as_ref().map(|s| (s.span().start, "proxy")),
        c.admin.as_ref().map(|s| (s.span().start, "admin")),
        c.audit.as_ref().map(|s| (s.span().start, "audit")),
        c.upstream.as_ref().map(|s| (s.span().start, "upstream")),
        c.auth.as_ref().map(|s| (s.span().start, "auth")),
        c.defaults.as_ref().map(|s| (s.span().start, "defaults")),
        c.groups.as_ref().map(|s| (s.span().start, "groups")),
        c.intercept.as_ref().map(|s| (s.span().start, "intercept")),
        c.inspect.as_ref().map(|s| (s.span().start, "inspect")),
        c.keys.as_ref().map(|s| (s.span().start, "keys")),
    ];
    if let Some((start, name)) = misplaced.into_iter().flatten().next() {
        return Err(src.error(
            super::At { file, start },
            format!("[{name}] belongs in the main config; an included file may hold only vendor and rule entries"),
        ));
    }
    Ok(())
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn add_vendor(
    src: &Sources,
    file: usize,
    v: &S<VendorDef>,
    catalog: &mut Catalog,
) -> Result<(), ConfigError> {
    let def = v.get_ref();
    let id = def.id.get_ref();
    if !valid_id(id) || id.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(src.error(
            src.at(file, &def.id),
            format!("vendor id {id:?} must be lowercase letters, digits, '-', '_' or '.'"),
        ));
    }
    if catalog.find_vendor(id).is_some() {
        return Err(src.error(src.at(file, &def.id), format!("duplicate vendor id {id:?}")));
    }
    // A vendor with no host matches nothing, and a rule naming it blocks nothing: what a
    // catalog cut short mid-save (an `id` line and no more) looks like, never what is meant.
    if def.hosts.is_empty() && def.app_hosts.is_empty() {
        return Err(src.error(
            src.at(file, &def.id),
            format!("vendor {id:?} names no host: give it hosts or app_hosts"),
        ));
    }
    let mut endpoints = Vec::new();
    if let Some(eps) = &def.endpoints {
        for (class, patterns) in eps.get_ref() {
            let Some(e) =
                Endpoint::parse(class).filter(|e| *e != Endpoint::App && *e != Endpoint::Unknown)
            else {
                return Err(src.error(
                    src.at(file, eps),
                    format!("unknown endpoint class {class:?} (known: chat, completions, embeddings, models, files, batches, fine_tuning, images, audio)"),
                ));
            };
            for p in patterns {
                let pat =
                    PathPattern::parse(p.get_ref()).map_err(|e| src.error(src.at(file, p), e))?;
                endpoints.push((e, pat));
            }
        }
    }
    let mut model_paths = Vec::new();
    for p in &def.model_paths {
        let prefix = p
            .get_ref()
            .strip_suffix("/{model}")
            .filter(|prefix| !prefix.contains(['{', '}']))
            .ok_or_else(|| {
                src.error(
                    src.at(file, p),
                    format!(
                        "model path {:?} must end in \"/{{model}}\" and name it once",
                        p.get_ref()
                    ),
                )
            })?;
        let prefix = match prefix {
            "" => "/",
            s => s,
        };
        model_paths.push(PathPattern::parse(prefix).map_err(|e| src.error(src.at(file, p), e))?);
    }
    let mut model_fields = Vec::new();
    for f in &def.model_fields {
        let path = PathPattern::parse(f.path.get_ref())
            .map_err(|e| src.error(src.at(file, &f.path), e))?;
        let field = crate::inspect::model::FieldPath::parse(f.field.get_ref())
            .map_err(|e| src.error(src.at(file, &f.field), e))?;
        let field = match f.lines {
            true => field.per_line(),
            false => field,
        };
        model_fields.push((path, field.unreadable_when(&f.unreadable_when)));
    }
    let vid = catalog.push_vendor(
        Vendor::new(id, def.name.as_deref().unwrap_or(id), endpoints)
            .with_model_paths(model_paths)
            .with_model_fields(model_fields),
    );
    for (hosts, app) in [(&def.hosts, false), (&def.app_hosts, true)] {
        for h in hosts {
            let pat = HostPattern::parse(h.get_ref()).map_err(|e| src.error(src.at(file, h), e))?;
            if let Err(other) = catalog.add_host(&pat, vid, app) {
                return Err(src.error(
                    src.at(file, h),
                    format!(
                        "host {:?} already belongs to vendor {other:?}",
                        pat.as_str()
                    ),
                ));
            }
        }
    }
    Ok(())
}

type Groups = (Vec<Arc<str>>, FxHashMap<Box<str>, u64>);

fn groups(src: &Sources, main: &ConfigFile) -> Result<Groups, ConfigError> {
    let mut names = Vec::new();
    let mut users: FxHashMap<Box<str>, u64> = FxHashMap::default();
    if let Some(g) = &main.groups {
        if g.get_ref().len() > MAX_GROUPS {
            return Err(src.error(src.at(0, g), format!("at most {MAX_GROUPS} groups")));
        }
        for (i, (name, members)) in g.get_ref().iter().enumerate() {
            names.push(Arc::from(name.as_str()));
            for m in members {
                *users.entry(m.as_str().into()).or_default() |= 1 << i;
            }
        }
    }
    Ok((names, users))
}

fn parse_action(src: &Sources, file: usize, a: &S<String>) -> Result<Action, ConfigError> {
    Action::parse(a.get_ref()).ok_or_else(|| {
        src.error(
            src.at(file, a),
            format!(
                "unknown action {:?} (allow, block, audit, limit)",
                a.get_ref()
            ),
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn compile_rule(
    src: &Sources,
    file: usize,
    def: &RuleDef,
    catalog: &Catalog,
    group_names: &[Arc<str>],
    named: &NamedLimits,
    scanner: &Scanner,
    n: u32,
    index: &mut RuleIndex,
) -> Result<Rule, ConfigError> {
    let err = |s: super::At, m: String| src.error(s, m);
    if !valid_id(def.id.get_ref()) {
        return Err(err(
            src.at(file, &def.id),
            format!(
                "rule id {:?} must be letters, digits, '-', '_' or '.' (at most 64)",
                def.id.get_ref()
            ),
        ));
    }
    let action = parse_action(src, file, &def.action)?;
    let mode = match &def.mode {
        None => Mode::Enforce,
        Some(m) => match m.get_ref().as_str() {
            "enforce" => Mode::Enforce,
            "shadow" => Mode::Shadow,
            other => {
                return Err(err(
                    src.at(file, m),
                    format!("unknown mode {other:?} (enforce, shadow)"),
                ))
            }
        },
    };
    // An empty list would read as "no condition" and widen the rule to every request.
    let conditions: [(&str, Option<(super::At, usize)>); 11] = [
        (
            "vendor",
            def.vendor
                .as_ref()
                .map(|v| (src.at(file, v), v.get_ref().as_slice().len())),
        ),
        (
            "host",
            def.host
                .as_ref()
                .map(|v| (src.at(file, v), v.get_ref().as_slice().len())),
        ),
        (
            "endpoint",
            def.endpoint
                .as_ref()
                .map(|v| (src.at(file, v), v.get_ref().as_slice().len())),
        ),
        (
            "path",
            def.path
                .as_ref()
                .map(|v| (src.at(file, v), v.get_ref().as_slice().len())),
        ),
        (
            "method",
            def.method
                .as_ref()
                .map(|v| (src.at(file, v), v.get_ref().as_slice().len())),
        ),
        (
            "port",
            def.port
                .as_ref()
                .map(|v| (src.at(file, v), v.get_ref().as_slice().len())),
        ),
        (
            "client",
            def.client
                .as_ref()
                .map(|v| (src.at(file, v), v.get_ref().as_slice().len())),
        ),
        (
            "user",
            def.user
                .as_ref()
                .map(|v| (src.at(file, v), v.get_ref().as_slice().len())),
        ),
        (
            "group",
            def.group
                .as_ref()
                .map(|v| (src.at(file, v), v.get_ref().as_slice().len())),
        ),
        (
            "model",
            def.model
                .as_ref()
                .map(|v| (src.at(file, v), v.get_ref().as_slice().len())),
        ),
        (
            "dlp",
            def.dlp
                .as_ref()
                .map(|v| (src.at(file, v), v.get_ref().as_slice().len())),
        ),
    ];
    for (key, given) in conditions {
        if let Some((at, 0)) = given {
            return Err(err(
                at,
                format!("{key} = [] matches nothing; leave the key out to match any {key}"),
            ));
        }
    }
    if let Some(p) = def
        .port
        .as_ref()
        .filter(|p| p.get_ref().as_slice().contains(&0))
    {
        return Err(err(src.at(file, p), "port must be 1-65535".into()));
    }
    let list = |v: &Option<S<super::types::OneOrMany<String>>>| -> Vec<(super::At, String)> {
        v.as_ref()
            .map(|s| {
                s.get_ref()
                    .as_slice()
                    .iter()
                    .map(|x| (src.at_item(file, s, x), x.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };

    let mut vendors = Vec::new();
    for (at, v) in list(&def.vendor) {
        match catalog.find_vendor(&v) {
            Some(id) => vendors.push(id),
            None => {
                return Err(err(
                    at,
                    format!("unknown vendor {v:?} (not in the catalog)"),
                ))
            }
        }
    }
    let mut endpoints = 0u16;
    for (at, e) in list(&def.endpoint) {
        match Endpoint::parse(&e) {
            Some(e) => endpoints |= e.bit(),
            None => return Err(err(at, format!("unknown endpoint class {e:?}"))),
        }
    }
    let mut paths = Vec::new();
    for (at, p) in list(&def.path) {
        paths.push(PathPattern::parse(&p).map_err(|e| err(at, e.to_string()))?);
    }
    let mut methods = Vec::new();
    for (at, m) in list(&def.method) {
        let up = m.to_ascii_uppercase();
        methods.push(Method::from_str(&up).map_err(|_| err(at, format!("invalid method {m:?}")))?);
    }
    let mut clients = Vec::new();
    for (at, c) in list(&def.client) {
        clients.push(parse_net(&c).map_err(|m| err(at, m))?);
    }
    let users = list(&def.user)
        .into_iter()
        .map(|(_, u)| u.into_boxed_str())
        .collect();
    let mut groups = 0u64;
    for (at, g) in list(&def.group) {
        match group_names.iter().position(|x| **x == *g) {
            Some(i) => groups |= 1 << i,
            None => {
                return Err(err(
                    at,
                    format!("unknown group {g:?} (define it under [groups])"),
                ))
            }
        }
    }
    let ports = def
        .port
        .as_ref()
        .map(|p| p.get_ref().as_slice().to_vec())
        .unwrap_or_default();
    let limits = match &def.limit {
        Some(v) => rule_limits(src, file, v, def.id.get_ref(), named)?,
        None => Vec::new(),
    };
    match (action, limits.is_empty()) {
        (Action::Limit, true) => {
            return Err(err(src.at(file, &def.action), "action \"limit\" needs limit = { requests = N, per = \"1m\" } (or bytes, concurrent, or a [limits.NAME])".into()))
        }
        (a, false) if a != Action::Limit => {
            let at = def.limit.as_ref().map_or(src.at(file, &def.action), |l| src.at(file, l));
            return Err(err(at, "limit = … only applies with action = \"limit\"".into()));
        }
        _ => {}
    }

    let models: Vec<Box<str>> = list(&def.model)
        .into_iter()
        .map(|(_, m)| m.to_ascii_lowercase().into_boxed_str())
        .collect();
    let mut dlp = 0u64;
    for (at, name) in list(&def.dlp) {
        if name == "all" {
            dlp |= match scanner.len() {
                n @ 0..=63 => (1u64 << n) - 1,
                _ => u64::MAX,
            };
            continue;
        }
        match scanner.index(&name) {
            Some(i) => dlp |= 1 << i,
            None => {
                return Err(err(
                    at,
                    format!(
                        "unknown DLP pattern {name:?} (built in: {}; or define it under [inspect.patterns]; or \"all\")",
                        crate::inspect::dlp::BUILTINS.join(", ")
                    ),
                ))
            }
        }
    }
    let require_keys = list(&def.require_key)
        .into_iter()
        .map(|(_, k)| k.into_boxed_str())
        .collect();
    let require_orgs = list(&def.require_org)
        .into_iter()
        .map(|(_, k)| k.into_boxed_str())
        .collect();
    let mut set_headers = Vec::new();
    if let Some(map) = &def.set_headers {
        for (name, value) in map.get_ref() {
            let n = http::HeaderName::from_str(name)
                .map_err(|_| err(src.at(file, map), format!("invalid header name {name:?}")))?;
            if is_hop_by_hop_or_framing(&n) {
                return Err(err(
                    src.at(file, map),
                    format!("set_headers may not set {name:?}: it is hop-by-hop or framing"),
                ));
            }
            let v = http::HeaderValue::from_str(value.get_ref())
                .map_err(|_| err(src.at(file, value), "invalid header value".into()))?;
            set_headers.push((n, v));
        }
    }
    let inside = !paths.is_empty() || !models.is_empty() || dlp != 0;

    let mut hosts = Vec::new();
    for (at, h) in list(&def.host) {
        // An address literal is matched by value, so every spelling of it is the same host.
        if let Ok(Host::Ip(ip)) = Host::parse(h.trim_matches(|c| c == '[' || c == ']')) {
            index.by_ip.entry(ip).or_default().push(n);
            hosts.push(ip.to_string().into_boxed_str());
            continue;
        }
        let pat = HostPattern::parse(&h).map_err(|e| err(at, e.to_string()))?;
        index.by_host.entry(&pat, Vec::new).0.push(n);
        hosts.push(pat.as_str().into());
    }
    if hosts.is_empty() {
        if vendors.is_empty() {
            index.generic.push(n);
            if !inside {
                index.generic_pathless.push(n);
            }
        } else {
            for v in &vendors {
                index.by_vendor[*v as usize].push(n);
                if !inside {
                    index.by_vendor_pathless[*v as usize].push(n);
                }
            }
        }
    }
    let reason = def.reason.clone().unwrap_or_else(|| match action {
        Action::Block => format!("blocked by rule {}", def.id.get_ref()),
        _ => format!("matched rule {}", def.id.get_ref()),
    });
    Ok(Rule {
        id: def.id.get_ref().as_str().into(),
        action,
        mode,
        reason: reason.into(),
        vendors,
        hosts,
        endpoints,
        paths,
        methods,
        ports,
        clients,
        users,
        groups,
        limits,
        models,
        dlp,
        require_keys,
        require_orgs,
        set_headers,
    })
}

fn is_hop_by_hop_or_framing(n: &http::HeaderName) -> bool {
    use http::header::*;
    [
        CONNECTION,
        CONTENT_LENGTH,
        HOST,
        PROXY_AUTHORIZATION,
        PROXY_AUTHENTICATE,
        TE,
        TRAILER,
        TRANSFER_ENCODING,
        UPGRADE,
    ]
    .contains(n)
        || n == "keep-alive"
        || n == "proxy-connection"
}

/// Built-in DLP patterns plus `[inspect.patterns]`; one scanner per policy.
fn dlp_scanner(src: &Sources, main: &ConfigFile) -> Result<Scanner, ConfigError> {
    let patterns = main
        .inspect
        .as_ref()
        .and_then(|i| i.get_ref().patterns.as_ref());
    let mut custom = Vec::new();
    if let Some(map) = patterns {
        for (name, re) in map.get_ref() {
            if !valid_id(name) {
                return Err(src.error(
                    src.at(0, map),
                    format!("DLP pattern name {name:?} must be letters, digits, '-', '_' or '.'"),
                ));
            }
            custom.push((name.clone(), re.get_ref().clone()));
        }
    }
    Scanner::new(&custom).map_err(|e| {
        // Point at the offending pattern when we can tell which one it is.
        let at = match (&e, patterns) {
            (DlpError::BadRegex { name, .. } | DlpError::Duplicate(name), Some(map)) => map
                .get_ref()
                .get(name)
                .map_or(src.at(0, map), |v| src.at(0, v)),
            (_, Some(map)) => src.at(0, map),
            (_, None) => super::At { file: 0, start: 0 },
        };
        src.error(at, e.to_string())
    })
}

/// `[intercept] vendors, hosts, exclude`.
fn intercept_lists(
    src: &Sources,
    main: &ConfigFile,
    catalog: &Catalog,
) -> Result<InterceptLists, ConfigError> {
    let mut lists = InterceptLists {
        vendors: vec![false; catalog.vendors().len()],
        ..InterceptLists::default()
    };
    let Some(i) = &main.intercept else {
        return Ok(lists);
    };
    let i = i.get_ref();
    for v in i.vendors.iter().flat_map(|l| l.get_ref()) {
        match catalog.find_vendor(v.get_ref()) {
            Some(id) => lists.vendors[id as usize] = true,
            None => {
                return Err(src.error(
                    src.at(0, v),
                    format!("unknown vendor {:?} (not in the catalog)", v.get_ref()),
                ))
            }
        }
    }
    for h in i.hosts.iter().flat_map(|l| l.get_ref()) {
        if let Ok(Host::Ip(ip)) = Host::parse(h.get_ref().trim_matches(|c| c == '[' || c == ']')) {
            lists.ips.push(ip);
        }
    }
    for (list, index) in [
        (&i.hosts, &mut lists.hosts),
        (&i.exclude, &mut lists.exclude),
    ] {
        for h in list.iter().flat_map(|l| l.get_ref()) {
            if Host::parse(h.get_ref().trim_matches(|c| c == '[' || c == ']'))
                .is_ok_and(|h| matches!(h, Host::Ip(_)))
            {
                continue;
            }
            let pat = HostPattern::parse(h.get_ref())
                .map_err(|e| src.error(src.at(0, h), e.to_string()))?;
            index.entry(&pat, || ());
        }
    }
    Ok(lists)
}

/// Body inspection, when some rule has a `model` or `dlp` condition.
fn inspection(
    src: &Sources,
    main: &ConfigFile,
    policy: &Policy,
    scanner: Scanner,
) -> Result<Option<Inspection>, ConfigError> {
    let body_rules: Vec<&Rule> = policy
        .rules
        .iter()
        .filter(|r| !r.models.is_empty() || r.dlp != 0)
        .collect();
    let none = Default::default();
    let sec: &super::types::InspectSection = main.inspect.as_ref().map_or(&none, |s| s.get_ref());
    let max_body = match &sec.max_body {
        Some(m) => parse_size(m.get_ref()).map_err(|e| src.error(src.at(0, m), e))?,
        None => 1 << 20,
    };
    if max_body == 0 || max_body > 64 << 20 {
        let at = sec
            .max_body
            .as_ref()
            .map_or(super::At { file: 0, start: 0 }, |m| src.at(0, m));
        return Err(src.error(at, "max_body must be between 1 byte and 64MiB"));
    }
    let max_buffered = match &sec.max_buffered {
        Some(m) => parse_size(m.get_ref()).map_err(|e| src.error(src.at(0, m), e))?,
        None => 256 << 20,
    };
    // The semaphore counts in u32 chunks of a byte each; below max_body one request could
    // never be inspected.
    if max_buffered < max_body || max_buffered > u32::MAX as u64 {
        let at = sec
            .max_buffered
            .as_ref()
            .map_or(super::At { file: 0, start: 0 }, |m| src.at(0, m));
        return Err(src.error(
            at,
            "max_buffered must be at least max_body and at most 4GiB",
        ));
    }
    let timeout = match &sec.timeout {
        Some(t) => parse_duration(t.get_ref()).map_err(|m| src.error(src.at(0, t), m))?,
        None => Duration::from_secs(10),
    };
    let dlp_fail_closed = match sec.dlp_past_max_body.as_ref() {
        None => false,
        Some(v) => match v.get_ref().as_str() {
            "pass" => false,
            "block" => true,
            other => {
                return Err(src.error(
                    src.at(0, v),
                    format!("dlp_past_max_body must be \"pass\" or \"block\", not {other:?}"),
                ))
            }
        },
    };
    if body_rules.is_empty() {
        return Ok(None);
    }
    let mut vendors = vec![false; policy.catalog.vendors().len()];
    let mut any_vendor = false;
    for r in &body_rules {
        if r.vendors.is_empty() {
            // A host-only rule: its hosts may belong to any vendor or none.
            any_vendor = true;
        }
        for v in &r.vendors {
            vendors[*v as usize] = true;
        }
    }
    Ok(Some(Inspection {
        scanner,
        max_body: max_body as usize,
        timeout,
        budget: Arc::new(crate::proxy::budget::InspectBudget::new(
            max_buffered as usize,
            max_body as usize,
        )),
        models: body_rules.iter().any(|r| !r.models.is_empty()),
        dlp: body_rules.iter().fold(0, |m, r| m | r.dlp),
        dlp_fail_closed,
        vendors,
        any_vendor,
    }))
}

type NamedLimits = FxHashMap<String, Vec<Arc<LimitSpec>>>;

/// `[limits.NAME]`: rules naming the same limit share its counters (a group budget).
fn named_limits(src: &Sources, main: &ConfigFile) -> Result<NamedLimits, ConfigError> {
    let mut out = FxHashMap::default();
    if let Some(map) = &main.limits {
        for (name, def) in map {
            let at = src.find(0, &format!("limits.{name}"));
            if !valid_id(name) {
                return Err(src.error(
                    at,
                    format!("limit name {name:?} must be letters, digits, '-', '_' or '.'"),
                ));
            }
            out.insert(name.clone(), limit_specs(src, at, name, def)?);
        }
    }
    Ok(out)
}

/// A rule's `limit`: a table, a name, or a list of either.
fn rule_limits(
    src: &Sources,
    file: usize,
    v: &S<toml::Value>,
    rule_id: &str,
    named: &NamedLimits,
) -> Result<Vec<Arc<LimitSpec>>, ConfigError> {
    let at = src.at(file, v);
    let items: Vec<&toml::Value> = match v.get_ref() {
        toml::Value::Array(a) => a.iter().collect(),
        one => vec![one],
    };
    let many = items.len() > 1;
    let mut out = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        match item {
            toml::Value::String(name) => match named.get(name) {
                Some(specs) => out.extend(specs.iter().cloned()),
                None => return Err(src.error(src.at_item(file, v, name), format!("unknown limit {name:?} (define it as [limits.{name}])"))),
            },
            toml::Value::Table(_) => {
                let def: LimitDef = item
                    .clone()
                    .try_into()
                    .map_err(|e: toml::de::Error| src.error(at, format!("limit: {}", e.message().trim_end())))?;
                let base = if many { format!("{rule_id}#{i}") } else { rule_id.to_string() };
                out.extend(limit_specs(src, at, &base, &def)?);
            }
            _ => return Err(src.error(at, "limit must be a table like { requests = 50, per = \"1m\" }, a limit name, or a list of them")),
        }
    }
    Ok(out)
}

/// One limit table → one spec per kind it sets (requests, bytes, concurrent).
fn limit_specs(
    src: &Sources,
    at: super::At,
    base: &str,
    def: &LimitDef,
) -> Result<Vec<Arc<LimitSpec>>, ConfigError> {
    let e = |m: String| src.error(at, m);
    let by = match &def.by {
        None => vec![KeyPart::Client],
        Some(list) => list
            .as_slice()
            .iter()
            .map(|b| match b.as_str() {
                "client" => Ok(KeyPart::Client),
                "user" => Ok(KeyPart::User),
                "key" => Ok(KeyPart::Key),
                "vendor" => Ok(KeyPart::Vendor),
                other => Err(e(format!(
                    "unknown limit key {other:?} (client, user, key, vendor)"
                ))),
            })
            .collect::<Result<_, _>>()?,
    };
    let per = match &def.per {
        Some(p) => {
            let d = parse_duration(p).map_err(&e)?;
            if d.is_zero() {
                return Err(e("limit period must be above zero".into()));
            }
            Some(d)
        }
        None => None,
    };
    let mut specs = Vec::new();
    let mut push = |kind: &str, k: LimitKind| {
        specs.push(Arc::new(LimitSpec {
            id: format!("{base}/{kind}").into(),
            kind: k,
            by: by.clone(),
        }))
    };
    if let Some(bytes) = &def.bytes {
        let n = parse_size(bytes).map_err(&e)?;
        if n == 0 {
            return Err(e("limit bytes must be above zero".into()));
        }
        let per = per.ok_or_else(|| e("limit bytes needs per = \"1h\" (the period)".into()))?;
        push("bytes", LimitKind::Bytes { bytes: n, per });
    }
    if let Some(c) = def.concurrent {
        if c == 0 || c > u32::MAX as u64 {
            return Err(e("limit concurrent must be between 1 and 4294967295".into()));
        }
        push("concurrent", LimitKind::Concurrent { max: c as u32 });
    }
    if let Some(r) = def.requests {
        if r == 0 {
            return Err(e("limit requests must be at least 1".into()));
        }
        let burst = def.burst.unwrap_or(r);
        if burst == 0 {
            return Err(e("limit burst must be at least 1".into()));
        }
        let per = per.ok_or_else(|| e("limit requests needs per = \"1m\" (the period)".into()))?;
        push(
            "requests",
            LimitKind::Rate {
                requests: r,
                per,
                burst,
            },
        );
    } else if def.burst.is_some() {
        return Err(e("burst goes with requests".into()));
    }
    if specs.is_empty() {
        return Err(e("a limit needs requests, bytes or concurrent".into()));
    }
    if per.is_some() && def.requests.is_none() && def.bytes.is_none() {
        return Err(e("per goes with requests or bytes".into()));
    }
    Ok(specs)
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = IpNet::from_str(s) {
        return Ok(n.trunc());
    }
    IpAddr::from_str(s)
        .map(IpNet::from)
        .map_err(|_| format!("invalid address or CIDR {s:?}"))
}

fn settings(src: &Sources, main: &ConfigFile) -> Result<Settings, ConfigError> {
    let dur = |v: &Option<S<String>>, default: &str| -> Result<Duration, ConfigError> {
        match v {
            Some(s) => {
                let d = parse_duration(s.get_ref()).map_err(|m| src.error(src.at(0, s), m))?;
                if d.is_zero() {
                    return Err(src.error(src.at(0, s), "duration must be above zero"));
                }
                Ok(d)
            }
            None => Ok(parse_duration(default).expect("built-in default")),
        }
    };
    let addr = |v: &Option<S<String>>, default: &str| -> Result<SocketAddr, ConfigError> {
        match v {
            Some(s) => SocketAddr::from_str(s.get_ref()).map_err(|_| {
                src.error(
                    src.at(0, s),
                    format!("invalid listen address {:?} (want ip:port)", s.get_ref()),
                )
            }),
            None => Ok(SocketAddr::from_str(default).expect("built-in default")),
        }
    };
    let count = |v: &Option<S<u64>>, default: u64, min: u64| -> Result<usize, ConfigError> {
        match v {
            Some(s) if *s.get_ref() < min => {
                Err(src.error(src.at(0, s), format!("must be at least {min}")))
            }
            Some(s) => Ok(*s.get_ref() as usize),
            None => Ok(default as usize),
        }
    };

    let p = main.proxy.as_ref().map(|s| s.get_ref());
    let none = Default::default();
    let p = p.unwrap_or(&none);
    let proxy = ProxySettings {
        listen: addr(&p.listen, "127.0.0.1:3128")?,
        header_read_timeout: dur(&p.header_read_timeout, "10s")?,
        idle_timeout: dur(&p.idle_timeout, "60s")?,
        client_hello_timeout: dur(&p.client_hello_timeout, "10s")?,
        shutdown_grace: dur(&p.shutdown_grace, "10s")?,
        max_header_bytes: count(&p.max_header_bytes, 64 * 1024, 8 * 1024)?,
        max_connections: count(&p.max_connections, 10_000, 1)?,
        tunnel_require_tls: p.tunnel_require_tls.unwrap_or(true),
        max_connections_per_client: count(&p.max_connections_per_client, 256, 0)?,
        body_timeout: dur(&p.body_timeout, "60s")?,
        send_timeout: dur(&p.send_timeout, "60s")?,
    };

    let none_admin = Default::default();
    let ad: &super::types::AdminSection = main.admin.as_ref().map_or(&none_admin, |a| a.get_ref());
    let admin = AdminSettings {
        listen: match &ad.listen {
            Some(l) if l.get_ref() == "off" => None,
            _ => Some(addr(&ad.listen, "127.0.0.1:9090")?),
        },
        token_file: ad.token_file.as_ref().map(|t| src.relative(0, t.get_ref())),
        pac: match &ad.pac {
            None => PacMode::Catalog,
            Some(p) if p.get_ref() == "catalog" => PacMode::Catalog,
            Some(p) if p.get_ref() == "all" => PacMode::All,
            Some(p) => {
                return Err(src.error(
                    src.at(0, p),
                    format!("unknown pac mode {:?} (catalog, all)", p.get_ref()),
                ))
            }
        },
        pac_proxy: ad.pac_proxy.as_ref().map(|p| p.get_ref().clone()),
    };
    let log_level = match main.log.as_ref().and_then(|l| l.get_ref().level.as_ref()) {
        Some(l) => {
            let v = l.get_ref().to_ascii_lowercase();
            if !["error", "warn", "info", "debug", "trace"].contains(&v.as_str()) {
                return Err(src.error(
                    src.at(0, l),
                    format!(
                        "unknown log level {:?} (error, warn, info, debug, trace)",
                        l.get_ref()
                    ),
                ));
            }
            v
        }
        None => "info".to_string(),
    };

    let a = main.audit.as_ref().map(|s| s.get_ref());
    let none_audit = Default::default();
    let a = a.unwrap_or(&none_audit);
    let audit = AuditSettings {
        path: match &a.path {
            Some(p) if p.get_ref() == "-" => None,
            Some(p) if p.get_ref().is_empty() => {
                return Err(src.error(src.at(0, p), "audit path is empty (use \"-\" for stdout)"))
            }
            Some(p) => Some(src.relative(0, p.get_ref())),
            None => None,
        },
        queue: count(&a.queue, 65_536, 1)?,
        max_size: match &a.max_size {
            Some(m) => parse_size(m.get_ref()).map_err(|e| src.error(src.at(0, m), e))?,
            None => 0,
        },
        keep: count(&a.keep, 5, 1)?,
        on_full: match &a.on_full {
            None => OnFull::Drop,
            Some(o) if o.get_ref() == "drop" => OnFull::Drop,
            Some(o) if o.get_ref() == "block" => OnFull::Block,
            Some(o) => {
                return Err(src.error(
                    src.at(0, o),
                    format!("unknown on_full {:?} (drop, block)", o.get_ref()),
                ))
            }
        },
    };

    let u = main.upstream.as_ref().map(|s| s.get_ref());
    let none_up = Default::default();
    let u = u.unwrap_or(&none_up);
    let mut resolve = FxHashMap::default();
    if let Some(map) = &u.resolve {
        for (k, v) in map.get_ref() {
            let (host, port) = target::from_connect_authority(k).map_err(|e| {
                src.error(
                    src.at(0, map),
                    format!("resolve key {k:?}: {e} (want host:port)"),
                )
            })?;
            let to = SocketAddr::from_str(v.get_ref()).map_err(|_| {
                src.error(
                    src.at(0, v),
                    format!("resolve target {:?} must be ip:port", v.get_ref()),
                )
            })?;
            resolve.insert((host, port), to);
        }
    }
    let mut allow_private = Vec::new();
    if let Some(list) = &u.allow_private {
        for n in list.get_ref() {
            allow_private.push(parse_net(n.get_ref()).map_err(|m| src.error(src.at(0, n), m))?);
        }
    }
    let upstream = UpstreamSettings {
        resolve,
        allow_private,
        ca_file: u.ca_file.as_ref().map(|c| src.relative(0, c.get_ref())),
        connect_timeout: dur(&u.connect_timeout, "5s")?,
        // As shipped: LLM calls can think for a while before their first byte.
        response_timeout: dur(&u.response_timeout, "120s")?,
        pool_idle_timeout: dur(&u.pool_idle_timeout, "90s")?,
        pool_max_idle_per_host: count(&u.pool_max_idle_per_host, 64, 0)?,
    };

    let intercept = match &main.intercept {
        Some(i) => {
            let i = i.get_ref();
            let validity = dur(&i.leaf_validity, "24h")?;
            if validity < Duration::from_secs(600) {
                let at = i
                    .leaf_validity
                    .as_ref()
                    .expect("only a set value can be this short");
                return Err(src.error(src.at(0, at), "leaf_validity must be at least 10m"));
            }
            Some(crate::tls::ca::AuthoritySettings {
                ca_cert: src.relative(0, i.ca_cert.get_ref()),
                ca_key: src.relative(0, i.ca_key.get_ref()),
                leaf_cache: count(&i.leaf_cache, 10_000, 1)?,
                leaf_validity: validity,
            })
        }
        None => None,
    };
    let key_secret_file = main
        .keys
        .as_ref()
        .and_then(|k| k.get_ref().secret_file.as_ref())
        .map(|f| src.relative(0, f.get_ref()));

    let auth = main.auth.as_ref().map(|a| {
        let a = a.get_ref();
        AuthSettings {
            htpasswd: src.relative(0, a.htpasswd.get_ref()),
            realm: a.realm.clone().unwrap_or_else(|| "portcullis".to_string()),
            required: a.required.unwrap_or(true),
        }
    });

    let none_bulk = Default::default();
    let b: &super::types::BulkSection = main.bulk.as_ref().map_or(&none_bulk, |b| b.get_ref());
    let bulk = if b.enabled == Some(false) {
        None
    } else {
        let opt = |v: &Option<S<u64>>| -> Result<Option<u64>, ConfigError> {
            match v {
                Some(s) if *s.get_ref() == 0 => Err(src.error(
                    src.at(0, s),
                    "threshold must be at least 1 (leave it out to not check it)",
                )),
                Some(s) => Ok(Some(*s.get_ref())),
                None => Ok(None),
            }
        };
        Some(crate::signals::bulk::BulkConfig {
            window: dur(&b.window, "1h")?,
            max_requests: opt(&b.max_requests)?.or(Some(5_000)),
            max_bytes: match &b.max_bytes {
                Some(m) => Some(parse_size(m.get_ref()).map_err(|e| src.error(src.at(0, m), e))?),
                None => Some(1 << 30),
            },
            max_distinct_keys: opt(&b.max_distinct_keys)?
                .or(Some(3))
                .map(|k| k.min(u32::MAX as u64) as u32),
            max_bulk_requests: opt(&b.max_bulk_requests)?.or(Some(100)),
            max_principals: count(&b.max_principals, 100_000, 1)?,
            top_n: count(&b.top_n, 20, 1)?,
        })
    };

    let none_store = Default::default();
    let ls: &super::types::LimitStoreSection = main
        .limit_store
        .as_ref()
        .map_or(&none_store, |l| l.get_ref());
    let limit_store = match ls.kind.as_ref().map(|k| (k, k.get_ref().as_str())) {
        None | Some((_, "memory")) => LimitStoreSettings::Memory {
            max_keys: count(&ls.max_keys, 1_000_000, 1)?,
        },
        Some((k, "redis")) => LimitStoreSettings::Redis {
            url: match &ls.url {
                Some(u)
                    if u.get_ref().starts_with("redis://")
                        || u.get_ref().starts_with("rediss://") =>
                {
                    u.get_ref().clone()
                }
                Some(u) => {
                    return Err(src.error(src.at(0, u), "url must start with redis:// or rediss://"))
                }
                None => {
                    return Err(src.error(
                        src.at(0, k),
                        "kind = \"redis\" needs url = \"redis://host:6379\"",
                    ))
                }
            },
            on_store_error: match ls
                .on_store_error
                .as_ref()
                .map(|o| (o, o.get_ref().as_str()))
            {
                None | Some((_, "allow")) => OnStoreError::Allow,
                Some((_, "deny")) => OnStoreError::Deny,
                Some((o, other)) => {
                    return Err(src.error(
                        src.at(0, o),
                        format!("unknown on_store_error {other:?} (allow, deny)"),
                    ))
                }
            },
            timeout: dur(&ls.timeout, "250ms")?,
        },
        Some((k, other)) => {
            return Err(src.error(
                src.at(0, k),
                format!("unknown limit store {other:?} (memory, redis)"),
            ))
        }
    };

    Ok(Settings {
        proxy,
        admin,
        audit,
        upstream,
        auth,
        log_level,
        bulk,
        limit_store,
        intercept,
        key_secret_file,
    })
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use crate::policy::{Action, Host, Request};

    /// Loads `text` (after a line including the shipped catalog) from a file named `p.toml`.
    fn load(text: &str) -> Result<crate::config::Loaded, crate::config::ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let vendors = concat!(env!("CARGO_MANIFEST_DIR"), "/config/vendors.toml");
        let file = dir.path().join("p.toml");
        std::fs::write(&file, format!("include = [{vendors:?}]\n{text}")).unwrap();
        crate::config::load(&file)
    }

    /// A host pattern with a port (or brackets), or ending in a number without being an IPv4
    /// address, used to load and then match nothing: rules, the catalog and `[intercept] hosts`
    /// refuse it, at the value, saying what to write.
    #[test]
    fn host_patterns_that_match_nothing_are_refused_where_written() {
        let cases = [
            // (config after the include line, line, column, words the message must carry)
            (
                "[[rule]]\nid = \"r\"\nhost = \"api.deepseek.com:443\"\naction = \"block\"\n",
                4,
                8,
                "port = [443]",
            ),
            (
                "[[rule]]\nid = \"r\"\nhost = [\"a.example\", \"1.2.3.4:443\"]\naction = \"block\"\n",
                4,
                22,
                "port = [443]",
            ),
            (
                "[[rule]]\nid = \"r\"\nhost = \"[2001:db8::1]:8443\"\naction = \"block\"\n",
                4,
                8,
                "port = [8443]",
            ),
            (
                "[[vendor]]\nid = \"x\"\nhosts = [\"api.x.example:443\"]\n",
                4,
                10,
                "port = [443]",
            ),
            (
                "[[vendor]]\nid = \"x\"\nhosts = [\"[::1]\"]\n",
                4,
                10,
                "port = [...]",
            ),
            (
                "[intercept]\nca_cert = \"ca.pem\"\nca_key = \"ca.key\"\nhosts = [\"api.x.example:443\"]\n",
                5,
                10,
                "port = [443]",
            ),
            (
                "[[rule]]\nid = \"r\"\nhost = [\"a.example\", \"300.1.1.1\"]\naction = \"block\"\n",
                4,
                22,
                "not a valid IPv4 address",
            ),
        ];
        for (text, line, col, words) in cases {
            let e = load(text).expect_err(text);
            assert_eq!((e.line, e.col), (line, col), "{text}: {e}");
            assert!(e.msg.contains(words), "{text}: {e}");
        }
    }

    /// A vendor's `model_paths` must end in `/{model}` and hold no other placeholder; the
    /// error points at the pattern.
    #[test]
    fn model_paths_name_the_model_segment_last() {
        for (path, col) in [
            ("/v1/models/*", 31),
            ("/v1/{model}/x", 31),
            ("/v1/{model}/{model}", 31),
            ("v1/{model}", 31),
        ] {
            let text = format!(
                "[[vendor]]\nid = \"x\"\nhosts = [\"api.x.example\"]\nmodel_paths = [\"/ok/{{model}}\", \"{path}\"]\n"
            );
            let e = load(&text).expect_err(&text);
            assert_eq!((e.line, e.col), (5, col), "{text}: {e}");
        }
        let loaded = load(
            "[[vendor]]\nid = \"x\"\nhosts = [\"api.x.example\"]\nmodel_paths = [\"/{model}\"]\n\
             [[rule]]\nid = \"r\"\nmodel = \"m1\"\naction = \"block\"\n",
        )
        .unwrap();
        let host = Host::parse("api.x.example").unwrap();
        assert_eq!(
            loaded.policy.path_model(&host, "/M1/run").as_deref(),
            Some("m1")
        );
    }

    /// A vendor's `model_fields` name a path pattern and a field; a bad one of either is
    /// reported where it is written.
    #[test]
    fn model_fields_are_checked_where_written() {
        let vendor = |entry: &str| {
            format!(
                "[[vendor]]\nid = \"x\"\nhosts = [\"api.x.example\"]\nmodel_fields = [{entry}]\n"
            )
        };
        for (entry, col) in [
            (r#"{ path = "v1/batch", field = "requests[].model" }"#, 26),
            (r#"{ path = "/v1/batch", field = "requests[][]" }"#, 47),
            (r#"{ path = "/v1/batch", field = "a..model" }"#, 47),
        ] {
            let e = load(&vendor(entry)).expect_err(entry);
            assert_eq!((e.line, e.col), (5, col), "{entry}: {e}");
        }
        let loaded = load(&vendor(
            r#"{ path = "/v1/batch", field = "requests[].model" }"#,
        ))
        .unwrap();
        let host = Host::parse("api.x.example").unwrap();
        assert_eq!(loaded.policy.model_fields(&host, "/v1/batch").len(), 1);
        assert_eq!(
            loaded.policy.model_fields(&host, "/v1%2Fbatch?x=1").len(),
            1
        );
        assert!(loaded.policy.model_fields(&host, "/v1/other").is_empty());
    }

    #[test]
    fn dlp_past_max_body_is_pass_or_block() {
        let e = load("[inspect]\ndlp_past_max_body = \"drop\"\n").expect_err("drop");
        assert_eq!((e.line, e.col), (3, 21), "{e}");
        let rule = "[[rule]]\nid = \"r\"\ndlp = \"all\"\naction = \"block\"\n";
        for (value, closed) in [("pass", false), ("block", true)] {
            let text = format!("{rule}[inspect]\ndlp_past_max_body = \"{value}\"\n");
            let p = load(&text).unwrap().policy;
            assert_eq!(p.inspection.map(|i| i.dlp_fail_closed), Some(closed));
        }
    }

    /// Address literals, IPv6 bracketed or not, are still rule and intercept hosts.
    #[test]
    fn address_literal_hosts_still_load() {
        let loaded = load(
            "[[rule]]\nid = \"r\"\nhost = [\"[2001:db8::7]\", \"2001:db8::8\", \"192.0.2.7\"]\naction = \"block\"\n\
             [intercept]\nca_cert = \"ca.pem\"\nca_key = \"ca.key\"\nhosts = [\"[2001:db8::7]\", \"192.0.2.7\"]\n",
        )
        .unwrap();
        let p = &loaded.policy;
        for host in ["[2001:db8::7]", "2001:db8::8", "192.0.2.7"] {
            let host = Host::parse(host).unwrap();
            let d = p.decide(&Request {
                client: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                user: None,
                method: &http::Method::GET,
                host: &host,
                port: 443,
                path: None,
                body: Default::default(),
            });
            assert_eq!(d.enforced(), Action::Block, "{host:?}");
        }
        assert!(p
            .intercept
            .intercepts(&Host::parse("2001:db8::7").unwrap(), None));
    }
}
