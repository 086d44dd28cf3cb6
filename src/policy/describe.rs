//! The compiled policy as operators read it: JSON for `/policy`, and a PAC file that sends the
//! catalog's hosts to the proxy. Neither holds a secret: rules carry no credentials, and group
//! membership is reported as counts.

use serde_json::{json, Value};

use super::catalog::Endpoint;
use super::Policy;

pub fn describe(p: &Policy) -> Value {
    let vendors: Vec<Value> = p
        .catalog
        .vendors()
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let (app, api): (Vec<_>, Vec<_>) = p
                .catalog
                .patterns()
                .filter(|(_, vid, _)| *vid as usize == i)
                .partition(|(_, _, app)| *app);
            json!({
                "id": &*v.id,
                "name": &*v.name,
                "hosts": api.iter().map(|(h, _, _)| *h).collect::<Vec<_>>(),
                "app_hosts": app.iter().map(|(h, _, _)| *h).collect::<Vec<_>>(),
            })
        })
        .collect();
    let rules: Vec<Value> = p
        .rules
        .iter()
        .map(|r| {
            let endpoints: Vec<&str> = Endpoint::CLASSES
                .iter()
                .chain([Endpoint::Unknown].iter())
                .filter(|e| r.endpoints & e.bit() != 0)
                .map(|e| e.as_str())
                .collect();
            let groups: Vec<&str> = p
                .group_names
                .iter()
                .enumerate()
                .filter(|(i, _)| r.groups & (1 << i) != 0)
                .map(|(_, g)| &**g)
                .collect();
            json!({
                "id": &*r.id,
                "action": r.action.as_str(),
                "mode": r.mode.as_str(),
                "reason": &*r.reason,
                "vendor": r.vendors.iter().map(|v| &*p.catalog.vendor(*v).id).collect::<Vec<_>>(),
                "host": r.hosts.iter().map(|h| &**h).collect::<Vec<_>>(),
                "endpoint": endpoints,
                "path": r.paths.iter().map(|x| x.as_str()).collect::<Vec<_>>(),
                "method": r.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                "port": &r.ports,
                "client": r.clients.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                "user": r.users.iter().map(|u| &**u).collect::<Vec<_>>(),
                "group": groups,
                "model": r.models.iter().map(|m| &**m).collect::<Vec<_>>(),
                "dlp": p.inspection.as_ref().map(|i| {
                    (0..i.scanner.len())
                        .filter(|b| r.dlp & (1 << b) != 0)
                        .map(|b| i.scanner.name(b))
                        .collect::<Vec<_>>()
                }),
                "require_key": r.require_keys.iter().map(|k| &**k).collect::<Vec<_>>(),
                "require_org": r.require_orgs.iter().map(|k| &**k).collect::<Vec<_>>(),
                // Names only: values may be tenant ids operators would rather not publish.
                "set_headers": r.set_headers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let groups: Vec<Value> = p
        .group_names
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let members = p
                .user_groups
                .values()
                .filter(|m| **m & (1 << i) != 0)
                .count();
            json!({ "name": &**g, "members": members })
        })
        .collect();
    json!({
        "default": { "action": p.default.action.as_str(), "reason": &*p.default.reason },
        "connect_ports": &p.connect_ports,
        "intercept": {
            "vendors": p.intercept.vendors.iter().enumerate().filter(|(_, on)| **on)
                .map(|(i, _)| &*p.catalog.vendors()[i].id).collect::<Vec<_>>(),
            "hosts": p.intercept.hosts.patterns().chain(p.intercept.ips.iter().map(|ip| ip.to_string()))
                .collect::<Vec<_>>(),
            "exclude": p.intercept.exclude.patterns().collect::<Vec<_>>(),
        },
        "groups": groups,
        "rules": rules,
        "vendors": vendors,
    })
}

/// A proxy auto-config file. `all`: everything through the proxy; otherwise only the
/// catalog's hosts (so the proxy sees AI traffic and nothing else).
pub fn pac(p: &Policy, proxy: &str, all: bool) -> String {
    // Every string goes into the script as a JSON string literal, which is a JavaScript one:
    // nothing in a name or the proxy address can end the literal.
    let js = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let target = js(&format!("PROXY {proxy}"));
    if all {
        return format!(
            "// portcullis: send everything to the proxy\nfunction FindProxyForURL(url, host) {{\n  return {target};\n}}\n"
        );
    }
    let mut exact = Vec::new();
    let mut suffixes = Vec::new();
    let mut globs = Vec::new();
    // The catalog's hosts, and those rules name beyond it (a rule blocking a host the
    // catalog does not list must see that host's traffic too).
    let catalog = p.catalog.patterns().map(|(pat, _, _)| pat.to_string());
    let ruled = p
        .rules
        .iter()
        .flat_map(|r| r.hosts.iter().map(|h| h.to_string()));
    for pat in catalog.chain(ruled) {
        let pat = pat.as_str();
        if let Some(rest) = pat.strip_prefix("*.") {
            suffixes.push(format!(".{rest}"));
        } else if let Some(rest) = pat.strip_prefix('.') {
            exact.push(rest.to_string());
            suffixes.push(format!(".{rest}"));
        } else if pat.contains('*') {
            globs.push(pat.to_string());
        } else {
            exact.push(pat.to_string());
        }
    }
    for v in [&mut exact, &mut suffixes, &mut globs] {
        v.sort();
        v.dedup();
    }
    let list = |v: &[String]| v.iter().map(|s| js(s)).collect::<Vec<_>>().join(",\n    ");
    format!(
        "// portcullis: send the AI vendors' hosts (the catalog's and the rules') to the proxy, the rest direct\n\
         var PROXY = {target};\n\
         var EXACT = {{}};\n\
         [\n    {exact}\n].forEach(function (h) {{ EXACT[h] = true; }});\n\
         var SUFFIXES = [\n    {suffixes}\n];\n\
         var GLOBS = [\n    {globs}\n];\n\
         function FindProxyForURL(url, host) {{\n\
         \x20 host = host.toLowerCase().replace(/\\.$/, \"\");\n\
         \x20 if (EXACT[host]) return PROXY;\n\
         \x20 for (var i = 0; i < SUFFIXES.length; i++) if (dnsDomainIs(host, SUFFIXES[i])) return PROXY;\n\
         \x20 for (var j = 0; j < GLOBS.length; j++) if (shExpMatch(host, GLOBS[j])) return PROXY;\n\
         \x20 return \"DIRECT\";\n\
         }}\n",
        exact = list(&exact),
        suffixes = list(&suffixes),
        globs = list(&globs),
    )
}
