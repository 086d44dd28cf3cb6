//! The vendor catalog: which AI vendor a host belongs to, and which endpoint class a path is.
//!
//! It is data (`config/vendors.toml`), compiled here into a [`HostIndex`] so that host → vendor
//! is a few hash probes, and per-vendor path patterns where the longest match wins.

use std::sync::Arc;

use super::hostmatch::{HostIndex, HostPattern};
use super::path::{PathPattern, PathTrie, Segments};
use super::target::Host;
use crate::inspect::model::FieldPath;

/// Endpoint classes. A closed set, because rules, audit and metric labels name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Models,
    Files,
    Batches,
    FineTuning,
    Images,
    Audio,
    /// A consumer chat/web app host.
    App,
    /// A vendor host, but the path is unknown (a tunnel) or matches no class.
    Unknown,
    /// Not a vendor in the catalog.
    None,
}

impl Endpoint {
    pub const CLASSES: [Endpoint; 10] = [
        Endpoint::Chat,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Models,
        Endpoint::Files,
        Endpoint::Batches,
        Endpoint::FineTuning,
        Endpoint::Images,
        Endpoint::Audio,
        Endpoint::App,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Models => "models",
            Endpoint::Files => "files",
            Endpoint::Batches => "batches",
            Endpoint::FineTuning => "fine_tuning",
            Endpoint::Images => "images",
            Endpoint::Audio => "audio",
            Endpoint::App => "app",
            Endpoint::Unknown => "unknown",
            Endpoint::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<Endpoint> {
        Endpoint::CLASSES
            .into_iter()
            .chain([Endpoint::Unknown])
            .find(|e| e.as_str() == s)
    }

    /// A bit for rule endpoint sets.
    pub fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// One vendor of the catalog.
#[derive(Debug)]
pub struct Vendor {
    pub id: Arc<str>,
    pub name: Arc<str>,
    endpoints: Vec<(Endpoint, PathPattern)>,
    /// The same patterns, for classifying a path in one walk.
    trie: PathTrie<Endpoint>,
    /// Path prefixes whose next segment names the model (`model_paths`, without `/{model}`).
    model_paths: Vec<PathPattern>,
    /// Path prefixes whose bodies name models at a field deeper than the top-level `model`.
    model_fields: Vec<(PathPattern, FieldPath)>,
}

impl Vendor {
    pub fn new(id: &str, name: &str, endpoints: Vec<(Endpoint, PathPattern)>) -> Vendor {
        let mut trie = PathTrie::default();
        for (e, p) in &endpoints {
            trie.insert(p, *e);
        }
        Vendor {
            id: id.into(),
            name: name.into(),
            endpoints,
            trie,
            model_paths: Vec::new(),
            model_fields: Vec::new(),
        }
    }

    /// Whether this vendor's API paths name the model (`model_paths`).
    pub fn names_models(&self) -> bool {
        !self.model_paths.is_empty()
    }

    /// Where this vendor's API paths name the model: each a prefix whose next segment does.
    pub fn with_model_paths(mut self, prefixes: Vec<PathPattern>) -> Vendor {
        self.model_paths = prefixes;
        self
    }

    /// Where this vendor's bodies name models deeper than the top-level `model`.
    pub fn with_model_fields(mut self, fields: Vec<(PathPattern, FieldPath)>) -> Vendor {
        self.model_fields = fields;
        self
    }

    /// The fields naming models in a body sent to `path`: those of every matching prefix.
    pub fn model_fields(&self, path: &Segments<'_>) -> Vec<&FieldPath> {
        self.model_fields
            .iter()
            .filter(|(p, _)| p.matches_segments(path))
            .map(|(_, f)| f)
            .collect()
    }
}

pub type VendorId = u16;

#[derive(Debug, Clone, Copy)]
struct HostEntry {
    vendor: VendorId,
    app: bool,
}

/// Where a host was found in the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VendorHit {
    pub vendor: VendorId,
    pub app: bool,
}

#[derive(Debug, Default)]
pub struct Catalog {
    vendors: Vec<Vendor>,
    hosts: HostIndex<HostEntry>,
    /// Every host pattern as written (normalised), for /policy and the PAC file.
    patterns: Vec<(Box<str>, VendorId, bool)>,
}

impl Catalog {
    pub fn push_vendor(&mut self, v: Vendor) -> VendorId {
        self.vendors.push(v);
        (self.vendors.len() - 1) as VendorId
    }

    /// Registers a host pattern; on a duplicate returns the id of the vendor that has it.
    pub fn add_host(
        &mut self,
        p: &HostPattern,
        vendor: VendorId,
        app: bool,
    ) -> Result<(), Arc<str>> {
        let (slot, fresh) = self.hosts.entry(p, || HostEntry { vendor, app });
        if !fresh {
            return Err(self.vendors[slot.vendor as usize].id.clone());
        }
        self.patterns.push((p.as_str().into(), vendor, app));
        Ok(())
    }

    pub fn vendors(&self) -> &[Vendor] {
        &self.vendors
    }

    pub fn vendor(&self, id: VendorId) -> &Vendor {
        &self.vendors[id as usize]
    }

    pub fn host_count(&self) -> usize {
        self.patterns.len()
    }

    /// (pattern, vendor, is app host) in catalog order.
    pub fn patterns(&self) -> impl Iterator<Item = (&str, VendorId, bool)> {
        self.patterns.iter().map(|(p, v, a)| (&**p, *v, *a))
    }

    pub fn find_vendor(&self, id: &str) -> Option<VendorId> {
        self.vendors
            .iter()
            .position(|v| &*v.id == id)
            .map(|i| i as VendorId)
    }

    /// Vendors are recognised by name only: an IP literal says nothing reliable about the
    /// vendor (shared CDNs), so rules on addresses use `host` instead.
    pub fn lookup(&self, host: &Host) -> Option<VendorHit> {
        let name = host.as_name()?;
        self.hosts.best(name).map(|e| VendorHit {
            vendor: e.vendor,
            app: e.app,
        })
    }

    /// The model a request's path names, for vendors whose APIs put it there (Gemini's
    /// `/v1beta/models/gemini-2.5-pro:generateContent`, Bedrock's `/model/{id}/invoke`): the
    /// segment after the longest of the vendor's `model_paths` prefixes the path matches. In
    /// the path's last segment a `:method` suffix (Google's custom methods) is not part of it.
    pub fn path_model<'s>(&self, hit: VendorHit, path: &Segments<'s>) -> Option<&'s str> {
        let v = self.vendor(hit.vendor);
        if !v.names_models() {
            return None;
        }
        let at = v
            .model_paths
            .iter()
            .filter(|p| p.matches_segments(path))
            .map(PathPattern::len)
            .max()?;
        let seg = path.segment(at)?;
        let model = match path.segment(at + 1) {
            Some(_) => seg,
            None => seg.rsplit_once(':').map_or(seg, |(m, _)| m),
        };
        (!model.is_empty()).then_some(model)
    }

    /// The endpoint class of a request to a vendor host; `path` is normalised, `None` for a
    /// tunnel whose path is not visible.
    pub fn classify(&self, hit: VendorHit, path: Option<&Segments<'_>>) -> Endpoint {
        let best = path.and_then(|path| {
            let v = self.vendor(hit.vendor);
            match path.is_splittable() {
                true => v.trie.longest(path),
                // A path too long to split on the stack: try each pattern.
                false => v
                    .endpoints
                    .iter()
                    .filter(|(_, p)| p.matches_segments(path))
                    .max_by_key(|(_, p)| p.len())
                    .map(|(e, _)| *e),
            }
        });
        match best {
            Some(e) => e,
            None if hit.app => Endpoint::App,
            None => Endpoint::Unknown,
        }
    }
}
