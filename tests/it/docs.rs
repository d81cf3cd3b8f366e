//! The user reference in `docs/` checked against the code, so that neither
//! can change without the other:
//!
//! - every key of the config schema ([`iris::config::schema`]) is in
//!   docs/configuration.md with its type and (where the page gives one as a
//!   TOML value) its default, and every key the page documents exists;
//! - every metric of [`iris::metrics::ALL`] is in docs/metrics.md with its
//!   type and labels, and every metric named in the docs or the README is
//!   in it;
//! - docs/errors.md's table lists exactly [`ErrorCode::ALL`], each with its
//!   status and type;
//! - every relative link in the repository's Markdown leads to a file (and
//!   a heading) in the repository.
//!
//! Markdown is read with `pulldown-cmark`; the config's keys and types come
//! from the schema's own `Deserialize`, through a probing deserializer.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use iris::config::schema::File as Config;
use iris::error_code::ErrorCode;
use pulldown_cmark::{Event, LinkType, Options, Parser, Tag, TagEnd};
use serde::de::value::{Error as ProbeError, MapDeserializer, SeqDeserializer};
use serde::de::{DeserializeOwned, Deserializer, IntoDeserializer, Visitor};

// ---------------------------------------------------------------------------
// The config schema, enumerated from its `Deserialize`.
//
// A probe rather than a description the schema keeps of itself: a second
// list of keys could drift from the derive, which is what these tests are
// for. Defaults need no description either: see `documented_defaults_…`.

/// Every key of `T`'s serde schema in the docs' notation (`server.listen`,
/// `upstreams[].name`, `clients[].budget.*`) with the kind of its value
/// (`string`, `integer`, `array of strings`, …), in schema order.
///
/// `T` is deserialized from a [`Probe`], which answers every question
/// serde's derive asks: a struct gets each of its `fields` in turn, an
/// option `Some`, a sequence one element, a map one entry named `*`, an enum
/// its first variant, a scalar a plausible value.
fn schema_of<T: DeserializeOwned>() -> Vec<(String, String)> {
    let keys = Keys::default();
    let probe = Probe {
        path: String::new(),
        keys: Rc::clone(&keys),
    };
    if let Err(e) = T::deserialize(probe) {
        panic!("the config schema could not be enumerated: {e}");
    }
    let mut seen = BTreeSet::new();
    let mut keys = keys.take();
    keys.retain(|(key, _)| seen.insert(key.clone()));
    keys
}

/// The keys found so far, with their kinds; shared by every probe of a run.
type Keys = Rc<RefCell<Vec<(String, String)>>>;

type Answer<'de, V> = Result<<V as Visitor<'de>>::Value, ProbeError>;

struct Probe {
    /// Where this value sits; ends in `[]` for an element of a sequence.
    path: String,
    keys: Keys,
}

impl Probe {
    fn at(&self, path: String) -> Probe {
        let keys = Rc::clone(&self.keys);
        Probe { path, keys }
    }

    /// Records a key whose value is not a table, then lets `visit` answer.
    fn leaf<V>(
        self,
        kind: &str,
        visit: impl FnOnce() -> Result<V, ProbeError>,
    ) -> Result<V, ProbeError> {
        let (key, kind) = match self.path.strip_suffix("[]") {
            Some(array) => (array.to_owned(), format!("array of {kind}s")),
            None => (self.path, kind.to_owned()),
        };
        self.keys.borrow_mut().push((key.clone(), kind));
        visit().map_err(|e| serde::de::Error::custom(format!("{key}: {e}")))
    }
}

/// So that serde's own `SeqDeserializer` and `MapDeserializer` hand out probes.
impl IntoDeserializer<'_, ProbeError> for Probe {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

macro_rules! leaves {
    ($($method:ident => $kind:literal, $visit:ident($value:expr);)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Answer<'de, V> {
            self.leaf($kind, || visitor.$visit($value))
        })*
    };
}

impl<'de> Deserializer<'de> for Probe {
    type Error = ProbeError;

    leaves! {
        deserialize_any => "value", visit_str("x");
        deserialize_bool => "boolean", visit_bool(false);
        deserialize_i8 => "integer", visit_i64(1);
        deserialize_i16 => "integer", visit_i64(1);
        deserialize_i32 => "integer", visit_i64(1);
        deserialize_i64 => "integer", visit_i64(1);
        deserialize_i128 => "integer", visit_i128(1);
        deserialize_u8 => "integer", visit_u64(1);
        deserialize_u16 => "integer", visit_u64(1);
        deserialize_u32 => "integer", visit_u64(1);
        deserialize_u64 => "integer", visit_u64(1);
        deserialize_u128 => "integer", visit_u128(1);
        deserialize_f32 => "number", visit_f64(1.0);
        deserialize_f64 => "number", visit_f64(1.0);
        deserialize_char => "string", visit_char('x');
        deserialize_str => "string", visit_str("x");
        deserialize_string => "string", visit_str("x");
        deserialize_bytes => "byte", visit_bytes(b"x");
        deserialize_byte_buf => "byte", visit_bytes(b"x");
    }

    // What no config file can spell (TOML has no unit or tuple) is a
    // "value" answered with a string, which such a type refuses by its key.
    serde::forward_to_deserialize_any! { unit unit_struct tuple tuple_struct identifier ignored_any }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Answer<'de, V> {
        visitor.visit_some(self)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &str, visitor: V) -> Answer<'de, V> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Answer<'de, V> {
        let element = self.at(format!("{}[]", self.path));
        visitor.visit_seq(SeqDeserializer::new(std::iter::once(element)))
    }
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Answer<'de, V> {
        self.deserialize_struct("", &["*"], visitor)
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Answer<'de, V> {
        let field = |name: &&'static str| match self.path.as_str() {
            "" => (*name, self.at((*name).to_owned())),
            path => (*name, self.at(format!("{path}.{name}"))),
        };
        visitor.visit_map(MapDeserializer::new(fields.iter().map(field)))
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Answer<'de, V> {
        let first = variants.first().copied().unwrap_or_default();
        self.leaf("string", || visitor.visit_enum(first.into_deserializer()))
    }
}

// ---------------------------------------------------------------------------
// Markdown, as pulldown-cmark reads it.

/// What the checks need of a Markdown page.
#[derive(Debug, Default)]
struct Page {
    tables: Vec<Table>,
    /// Each heading's text, as rendered (code spans' content, no markup).
    headings: Vec<String>,
    /// The destination of each link and image, as written.
    links: Vec<String>,
    /// All text, code spans and code blocks included, a line per block and
    /// per cell: where metric names are looked for.
    text: String,
}

#[derive(Debug, Default)]
struct Table {
    header: Vec<Cell>,
    rows: Vec<Vec<Cell>>,
}

/// A table cell: its text as rendered, and its code spans on their own.
#[derive(Debug, Default, PartialEq)]
struct Cell {
    text: String,
    code: Vec<String>,
}

impl Cell {
    /// The cell's content if it is one code span and nothing else.
    fn only_code(&self) -> Option<&str> {
        match self.code.as_slice() {
            [one] if self.text.trim() == one => Some(one),
            _ => None,
        }
    }
}

fn parse(markdown: &str) -> Page {
    let mut page = Page::default();
    let (mut heading, mut row, mut cell) = (None::<String>, None::<Vec<Cell>>, None::<Cell>);
    for event in Parser::new_ext(markdown, Options::ENABLE_TABLES) {
        if matches!(event, Event::End(_) | Event::SoftBreak | Event::HardBreak) {
            page.text.push('\n'); // so that no two cells' or blocks' words run together
        }
        match event {
            Event::Start(Tag::Table(_)) => page.tables.push(Table::default()),
            Event::Start(Tag::TableHead | Tag::TableRow) => row = Some(Vec::new()),
            Event::Start(Tag::TableCell) => cell = Some(Cell::default()),
            Event::End(TagEnd::TableCell) => {
                row.iter_mut().zip(cell.take()).for_each(|(r, c)| r.push(c))
            }
            Event::End(TagEnd::TableHead) => {
                if let (Some(table), Some(row)) = (page.tables.last_mut(), row.take()) {
                    table.header = row;
                }
            }
            Event::End(TagEnd::TableRow) => {
                if let (Some(table), Some(row)) = (page.tables.last_mut(), row.take()) {
                    table.rows.push(row);
                }
            }
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::End(TagEnd::Heading(_)) => page.headings.extend(heading.take()),
            Event::Start(Tag::Link {
                link_type,
                dest_url,
                ..
            }) if link_type != LinkType::Email => page.links.push(dest_url.into_string()),
            Event::Start(Tag::Image { dest_url, .. }) => page.links.push(dest_url.into_string()),
            Event::Text(text) | Event::Html(text) | Event::InlineHtml(text) => {
                heading.iter_mut().for_each(|h| h.push_str(&text));
                cell.iter_mut().for_each(|c| c.text.push_str(&text));
                page.text.push_str(&text);
            }
            Event::Code(code) => {
                heading.iter_mut().for_each(|h| h.push_str(&code));
                if let Some(cell) = &mut cell {
                    cell.text.push_str(&code);
                    cell.code.push(code.to_string());
                }
                // Spaced, so a name in a code span never runs into the text around it.
                page.text.push_str(&format!(" {code} "));
            }
            _ => {}
        }
    }
    page
}

/// GitHub's anchors for `headings`: lowercased, spaces to `-`, punctuation
/// but `-` and `_` dropped, a repeated one numbered from `-1`.
fn anchors(headings: &[String]) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for heading in headings {
        let slug: String = heading
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let count = seen.entry(slug.clone()).or_default();
        anchors.insert(if *count == 0 {
            slug
        } else {
            format!("{slug}-{count}")
        });
        *count += 1;
    }
    anchors
}

/// Every table of `page` whose header's first cell is `first`, with its
/// rows keyed by the first cell's one code span (`doc` names the page in a
/// failure).
fn rows_of<'p>(
    page: &'p Page,
    first: &str,
    doc: &str,
) -> Vec<(&'p str, BTreeMap<&'p str, &'p Cell>)> {
    let mut found = Vec::new();
    for table in &page.tables {
        if table.header.first().is_none_or(|h| h.text != first) {
            continue;
        }
        for row in &table.rows {
            let Some(name) = row.first().and_then(Cell::only_code) else {
                panic!(
                    "{doc}: a row of a `{first}` table does not start with one `{first}`: {row:?}"
                );
            };
            let cells = table
                .header
                .iter()
                .map(|h| h.text.as_str())
                .zip(row)
                .collect();
            found.push((name, cells));
        }
    }
    found
}

/// The `column` cell of a row from [`rows_of`]; a missing column fails.
fn cell<'c>(row: &BTreeMap<&str, &'c Cell>, column: &str, doc: &str) -> &'c Cell {
    row.get(column)
        .copied()
        .unwrap_or_else(|| panic!("{doc}: a table has no {column:?} column: {row:?}"))
}

/// `iris_*` metric names mentioned in `text`; a name followed by `*` is a
/// prefix (`iris_image_*`).
fn metric_names_in(text: &str) -> Vec<(String, bool)> {
    let mut names = Vec::new();
    for (start, _) in text.match_indices("iris_") {
        let before = text[..start].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let prefix = text[start + name.len()..].starts_with('*');
        names.push((name, prefix));
    }
    names
}

// ---------------------------------------------------------------------------
// Reading the repository's files.

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every Markdown file of the repository (outside build output, dependencies
/// and hidden directories), as paths from the repository root.
fn markdown_files() -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "node_modules" {
                    walk(root, &path, out);
                }
            } else if name.ends_with(".md")
                && let Ok(relative) = path.strip_prefix(root)
            {
                out.push(relative.display().to_string());
            }
        }
    }
    let root = repo();
    let mut files = Vec::new();
    walk(&root, &root, &mut files);
    files.sort();
    files
}

// ---------------------------------------------------------------------------
// docs/configuration.md

const CONFIGURATION: &str = "docs/configuration.md";

#[test]
fn every_config_key_is_documented_with_its_type_and_every_documented_key_exists() {
    let schema = schema_of::<Config>();
    assert!(
        schema.len() > 30,
        "the probe found too few config keys: {schema:?}"
    );
    let page = parse(&read(CONFIGURATION));
    let mut documented = BTreeMap::new();
    let mut problems = Vec::new();
    for (key, row) in rows_of(&page, "key", CONFIGURATION) {
        if documented.insert(key, row).is_some() {
            problems.push(format!("{CONFIGURATION} documents {key} twice"));
        }
    }
    for (key, kind) in &schema {
        match documented.get(key.as_str()) {
            None => problems.push(format!(
                "{CONFIGURATION} does not document the config key {key}"
            )),
            Some(row) => {
                let written = &cell(row, "type", CONFIGURATION).text;
                if written != kind {
                    problems.push(format!(
                        "{CONFIGURATION} gives {key} the type {written:?}; the schema's is {kind:?}"
                    ));
                }
            }
        }
    }
    for key in documented.keys() {
        if !schema.iter().any(|(k, _)| k == key) {
            problems.push(format!(
                "{CONFIGURATION} documents {key}, which is not a config key"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A config table with nothing but the tables leading to `key` (one entry
/// in each array of tables) and, if given, `value` at `key`.
fn config_with(key: &str, value: Option<toml::Value>) -> toml::Table {
    let mut table = toml::Table::new();
    match key.split_once('.') {
        None => {
            if let Some(value) = value {
                table.insert(key.to_owned(), value);
            }
        }
        Some((head, rest)) => {
            let inner = toml::Value::Table(config_with(rest, value));
            match head.strip_suffix("[]") {
                Some(array) => table.insert(array.to_owned(), toml::Value::Array(vec![inner])),
                None => table.insert(head.to_owned(), inner),
            };
        }
    }
    table
}

/// The config read from `table`, printed (`Debug` shows every value).
fn debug_of(table: toml::Table) -> Result<String, String> {
    toml::Value::Table(table)
        .try_into::<Config>()
        .map(|config| format!("{config:?}"))
        .map_err(|e| e.to_string())
}

/// A default written as one code span is a TOML value, and setting a key to
/// it must change nothing: it is what the code does when the key is absent.
#[test]
fn documented_defaults_are_the_code_defaults() {
    let page = parse(&read(CONFIGURATION));
    let mut problems = Vec::new();
    let mut checked = 0;
    for (key, row) in rows_of(&page, "key", CONFIGURATION) {
        let Some(literal) = cell(&row, "default", CONFIGURATION).only_code() else {
            continue; // prose: "required", "none", "the model's `name`"
        };
        let Some(value) = format!("v = {literal}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut parsed| parsed.remove("v"))
        else {
            problems.push(format!(
                "{CONFIGURATION} gives the default of {key} as `{literal}`, which is not a TOML value"
            ));
            continue;
        };
        match (debug_of(config_with(key, None)), debug_of(config_with(key, Some(value)))) {
            (Ok(absent), Ok(set)) if absent == set => checked += 1,
            (Ok(_), Ok(_)) => problems.push(format!(
                "{CONFIGURATION} says {key} defaults to {literal}, but the code's default is another value"
            )),
            (_, Err(e)) | (Err(e), _) => problems.push(format!(
                "{CONFIGURATION}: {key} = {literal} does not deserialize: {e}"
            )),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked > 20, "only {checked} defaults were checked");
}

// ---------------------------------------------------------------------------
// docs/metrics.md

const METRICS: &str = "docs/metrics.md";

fn metric(name: &str) -> Option<&'static iris::metrics::Metric> {
    iris::metrics::ALL.iter().find(|m| m.name == name)
}

#[test]
fn every_metric_is_documented_with_its_type_and_labels() {
    assert!(
        iris::metrics::ALL.len() >= 10,
        "too few metrics in iris::metrics::ALL"
    );
    let page = parse(&read(METRICS));
    let documented: BTreeMap<_, _> = rows_of(&page, "metric", METRICS).into_iter().collect();
    let mut problems = Vec::new();
    for metric in iris::metrics::ALL {
        let name = metric.name;
        let Some(row) = documented.get(name) else {
            problems.push(format!("{METRICS} does not list {name}"));
            continue;
        };
        let (kind, labels) = (cell(row, "type", METRICS), cell(row, "labels", METRICS));
        if kind.text != metric.kind.as_str() {
            problems.push(format!(
                "{METRICS} says {name} is a {}; it is a {}",
                kind.text,
                metric.kind.as_str()
            ));
        }
        let written: BTreeSet<&str> = labels.code.iter().map(String::as_str).collect();
        let code: BTreeSet<&str> = metric.labels.iter().copied().collect();
        if written != code {
            problems.push(format!(
                "{METRICS} gives {name} the labels {written:?}; its labels are {code:?}"
            ));
        }
    }
    for name in documented.keys() {
        if metric(name).is_none() {
            problems.push(format!(
                "{METRICS} lists {name}, which is not in iris::metrics::ALL"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_metric_named_in_the_docs_exists() {
    let mut pages = vec!["README.md".to_owned()];
    pages.extend(
        markdown_files()
            .into_iter()
            .filter(|p| p.starts_with("docs/")),
    );
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in pages {
        for (name, prefix) in metric_names_in(&parse(&read(&page)).text) {
            checked += 1;
            // A histogram's series: `iris_x_seconds_bucket` is iris_x_seconds's.
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| metric(base).is_some())
                })
                .unwrap_or(&name);
            let exists = if prefix {
                iris::metrics::ALL.iter().any(|m| m.name.starts_with(base))
            } else {
                metric(base).is_some()
            };
            if !exists {
                problems.push(format!(
                    "{page} names the metric {name}{}, which is not in iris::metrics::ALL",
                    if prefix { "*" } else { "" }
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        checked > 20,
        "only {checked} metric names were found in the docs"
    );
}

// ---------------------------------------------------------------------------
// docs/errors.md

const ERRORS: &str = "docs/errors.md";

/// `docs/errors.md`'s table lists exactly [`ErrorCode::ALL`], each with its
/// status (`–` for a code that is never an HTTP answer) and type.
#[test]
fn every_error_code_is_documented_with_its_status_and_type() {
    let page = parse(&read(ERRORS));
    let documented: BTreeMap<_, _> = rows_of(&page, "code", ERRORS).into_iter().collect();
    let mut problems = Vec::new();
    for code in ErrorCode::ALL {
        let Some(row) = documented.get(code.as_str()) else {
            problems.push(format!(
                "{ERRORS} does not list the error code {code:?} ({})",
                code.as_str()
            ));
            continue;
        };
        let name = code.as_str();
        let status = code
            .status()
            .map_or("–".to_owned(), |s| s.as_u16().to_string());
        let written = cell(row, "status", ERRORS).text.trim();
        if written != status {
            problems.push(format!(
                "{ERRORS} gives {name} the status {written}; its status is {status}"
            ));
        }
        let written = cell(row, "type", ERRORS).only_code().unwrap_or("");
        if written != code.error_type() {
            problems.push(format!(
                "{ERRORS} gives {name} the type `{written}`; its type is `{}`",
                code.error_type()
            ));
        }
    }
    for name in documented.keys() {
        if !ErrorCode::ALL.iter().any(|c| c.as_str() == *name) {
            problems.push(format!(
                "{ERRORS} lists {name}, which is not in ErrorCode::ALL"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// Links

#[test]
fn every_relative_link_leads_to_a_file_and_heading_in_the_repository() {
    let root = repo()
        .canonicalize()
        .unwrap_or_else(|e| panic!("cannot resolve the repository root: {e}"));
    let pages = markdown_files();
    assert!(
        pages.iter().any(|p| p == "docs/README.md"),
        "no docs/README.md among {pages:?}"
    );
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in &pages {
        for target in parse(&read(page)).links {
            if ["http://", "https://", "mailto:"]
                .iter()
                .any(|s| target.starts_with(s))
            {
                continue;
            }
            checked += 1;
            let (path, fragment) = target.split_once('#').unwrap_or((&target, ""));
            if path.starts_with('/') {
                problems.push(format!(
                    "{page}: the link {target} is absolute; make it relative"
                ));
                continue;
            }
            let file = match root.join(page).parent() {
                _ if path.is_empty() => root.join(page),
                Some(dir) => dir.join(path),
                None => root.join(path),
            };
            let Some(file) = file.canonicalize().ok().filter(|f| f.starts_with(&root)) else {
                problems.push(format!(
                    "{page}: the link {target} leads to no file in the repository"
                ));
                continue;
            };
            if !fragment.is_empty() && file.extension().is_some_and(|e| e == "md") {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                if !anchors(&parse(&text).headings).contains(fragment) {
                    problems.push(format!(
                        "{page}: the link {target} names no heading of {path}"
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked > 20, "only {checked} relative links were found");
}

// ---------------------------------------------------------------------------
// The readers checked: each finds what it must on a small known input.

#[test]
fn the_probe_enumerates_nested_structs_arrays_options_maps_and_enums() {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Root {
        name: String,
        section: Section,
        entries: Vec<Entry>,
        tags: Vec<String>,
        limit: Option<u64>,
        by_name: std::collections::HashMap<String, bool>,
    }
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Section {
        kind: Kind,
        on: bool,
    }
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Entry {
        inner: Option<Section>,
        secret: iris::secret::Secret,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    #[allow(dead_code)]
    enum Kind {
        First,
        Second,
    }
    assert_eq!(
        schema_of::<Root>(),
        [
            ("name", "string"),
            ("section.kind", "string"),
            ("section.on", "boolean"),
            ("entries[].inner.kind", "string"),
            ("entries[].inner.on", "boolean"),
            ("entries[].secret", "string"),
            ("tags", "array of strings"),
            ("limit", "integer"),
            ("by_name.*", "boolean"),
        ]
        .map(|(k, t)| (k.to_owned(), t.to_owned()))
    );
}

#[test]
fn the_markdown_reader_finds_tables_headings_links_and_names() {
    let page = parse(concat!(
        "# `POST /v1/chat/completions`\n",
        "## `[clients.budget]`: the [limits](#a)\n",
        "## A\n",
        "A\n",
        "-\n",
        "\n",
        "| key | type |\n",
        "|---|---|\n",
        "| `a.b` | string |\n",
        "| `x \\| y` | array of `u8` |\n",
        "\n",
        "| other | cells |\n",
        "|---|---|\n",
        "| iris_d_total | iris_e_total |\n",
        "\n",
        "See ![i](img.png), [b][ref], `iris_a_total{x}`, iris_b_seconds_bucket,\n",
        "`iris_image_*` and <someone@example.com>.\n",
        "\n",
        "[ref]: b.md#c\n",
        "\n",
        "```\n",
        "# not a heading [nor](a-link.md)\n",
        "| not | a table |\n",
        "|---|---|\n",
        "iris_c_total 1\n",
        "```\n",
    ));
    assert_eq!(
        anchors(&page.headings),
        [
            "a",
            "a-1",
            "clientsbudget-the-limits",
            "post-v1chatcompletions"
        ]
        .map(str::to_owned)
        .into()
    );
    assert_eq!(page.links, ["#a", "img.png", "b.md#c"]);
    assert_eq!(page.tables.len(), 2);
    let rows = rows_of(&page, "key", "test");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].0, "a.b");
    assert_eq!(cell(&rows[0].1, "type", "test").text, "string");
    assert_eq!(rows[1].0, "x | y");
    let kind = cell(&rows[1].1, "type", "test");
    assert_eq!(
        (kind.text.as_str(), kind.code.as_slice()),
        ("array of u8", &["u8".to_owned()][..])
    );
    assert_eq!(kind.only_code(), None);
    assert_eq!(
        metric_names_in(&page.text),
        [
            ("iris_d_total".to_owned(), false),
            ("iris_e_total".to_owned(), false),
            ("iris_a_total".to_owned(), false),
            ("iris_b_seconds_bucket".to_owned(), false),
            ("iris_image_".to_owned(), true),
            ("iris_c_total".to_owned(), false),
        ]
    );
}
