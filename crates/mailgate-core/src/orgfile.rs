//! The directory file (`org.yaml`): parsing with line numbers, and reporting every problem at once.
//!
//! A YAML file is read into a tree that remembers where each node stood, converted to JSON, and
//! each entry is then decoded on its own, so one bad entry does not hide the problems of the others.
//! Problems found later (by [`crate::validate`]) are mapped back to file positions through the
//! identity of the entry they concern.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::directory::{Directory, Kind};
use crate::validate::Issue;

/// A position in the file (1-based line and column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

/// One problem in a directory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where, when known.
    pub location: Option<Location>,
    /// Which field, e.g. `users[alice@example.com].org_unit`.
    pub path: String,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some(l) => write!(f, "line {}, column {}: ", l.line, l.column)?,
            None => f.write_str("(stored directory): ")?,
        }
        self.fmt_what(f)
    }
}

impl Problem {
    /// The problem in a file, the way compilers write it so editors can jump there:
    /// `org.yaml:3:5: users[x].status: unknown variant ...` (`org.yaml: ...` without a
    /// position).
    pub fn in_file(&self, file: &str) -> String {
        match self.location {
            Some(l) => format!("{file}:{}:{}: {}", l.line, l.column, What(self)),
            None => format!("{file}: {}", What(self)),
        }
    }

    /// `path: message`, or the message alone when the problem concerns no field (a YAML
    /// syntax error).
    fn fmt_what(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

struct What<'a>(&'a Problem);

impl fmt::Display for What<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt_what(f)
    }
}

/// A parsed directory file.
#[derive(Debug, Clone)]
pub struct OrgFile {
    /// What the file describes.
    pub directory: Directory,
    /// The sections the file names (for merging: a section not named is left alone).
    pub sections: BTreeSet<Kind>,
    /// JSON pointer (`/users/2/org_unit`) -> position.
    locations: HashMap<String, Location>,
    /// (kind, identity) -> index of the entry in its section.
    entries: HashMap<(Kind, String), usize>,
    /// Entries that failed to decode: their identities still count as existing, so that
    /// references to them do not produce a second, misleading problem.
    pub undecoded: HashSet<(Kind, String)>,
}

impl OrgFile {
    /// Parses a directory file, returning every problem found in it.
    pub fn parse(src: &str) -> Result<OrgFile, Vec<Problem>> {
        let (file, problems) = OrgFile::parse_lenient(src)?;
        if problems.is_empty() {
            Ok(file)
        } else {
            Err(problems)
        }
    }

    /// Parses a directory file, keeping every entry that decodes: the caller can then also
    /// validate what did decode and report all problems in one pass. Fails outright only when the
    /// file is not YAML or not a mapping of sections.
    pub fn parse_lenient(src: &str) -> Result<(OrgFile, Vec<Problem>), Vec<Problem>> {
        let docs = MarkedYaml::load_from_str(src).map_err(|e| {
            vec![Problem {
                location: Some(Location {
                    line: e.marker().line(),
                    column: e.marker().col() + 1,
                }),
                path: String::new(),
                message: format!("not valid YAML: {}", e.info()),
            }]
        })?;
        let mut file = OrgFile {
            directory: Directory::default(),
            sections: BTreeSet::new(),
            locations: HashMap::new(),
            entries: HashMap::new(),
            undecoded: HashSet::new(),
        };
        let Some(root) = docs.first() else {
            return Ok((file, vec![]));
        };
        if docs.len() > 1 {
            return Err(vec![Problem {
                location: docs.get(1).map(|d| loc(&d.span.start)),
                path: String::new(),
                message: "the file holds several YAML documents; put the directory in one".into(),
            }]);
        }
        let mut problems = Vec::new();
        let json = to_json(root, "", &mut file.locations, &mut problems);
        let Value::Object(sections) = json else {
            if json.is_null() {
                return Ok((file, vec![]));
            }
            return Err(vec![Problem {
                location: Some(loc(&root.span.start)),
                path: String::new(),
                message: "the directory file must be a mapping of sections (domains:, users:, ...)"
                    .into(),
            }]);
        };

        let mut whole = serde_json::Map::new();
        for (name, value) in sections {
            let Some(kind) = Kind::from_section(&name) else {
                let known: Vec<_> = Kind::ALL.iter().map(|k| k.section()).collect();
                problems.push(file.problem_at(
                    &format!("/{name}"),
                    name.clone(),
                    format!("unknown section, expected one of: {}", known.join(", ")),
                ));
                continue;
            };
            file.sections.insert(kind);
            if value.is_null() {
                continue;
            }
            let decoded = if kind.is_singleton() {
                file.decode_singleton(kind, value, &mut problems)
            } else {
                file.decode_list(kind, value, &mut problems)
            };
            if let Some(v) = decoded {
                whole.insert(name, v);
            }
        }
        match serde_json::from_value::<Directory>(Value::Object(whole)) {
            Ok(d) => file.directory = d,
            Err(e) => problems.push(Problem {
                location: None,
                path: String::new(),
                message: format!("internal: decoded sections do not assemble: {e}"),
            }),
        }
        problems.sort_by_key(|p| p.location);
        Ok((file, problems))
    }

    /// Where the entry `(kind, id)` and its `field` (a `/`-separated path) stand in the file.
    pub fn locate(&self, kind: Kind, id: &str, field: &str) -> Option<Location> {
        let base = if kind.is_singleton() {
            format!("/{}", kind.section())
        } else {
            let i = self.entries.get(&(kind, id.to_owned()))?;
            format!("/{}/{i}", kind.section())
        };
        let mut pointer = if field.is_empty() {
            base.clone()
        } else {
            format!("{base}/{field}")
        };
        // Fall back to the nearest enclosing node that exists (e.g. a missing field -> its entry).
        loop {
            if let Some(l) = self.locations.get(&pointer) {
                return Some(*l);
            }
            match pointer.rfind('/') {
                Some(0) | None => return None,
                Some(i) => pointer.truncate(i),
            }
        }
    }

    /// Turns a validation issue into a problem located in this file, if the entry comes from it.
    pub fn problem_for(&self, issue: &Issue) -> Problem {
        Problem {
            location: self.locate(issue.kind, &issue.id, &issue.field),
            path: issue.path(),
            message: issue.message.clone(),
        }
    }

    /// Whether the entry `(kind, id)` is named in this file.
    pub fn names(&self, kind: Kind, id: &str) -> bool {
        self.entries.contains_key(&(kind, id.to_owned()))
    }

    fn problem_at(&self, pointer: &str, path: String, message: String) -> Problem {
        let mut p = pointer.to_owned();
        let location = loop {
            if let Some(l) = self.locations.get(&p) {
                break Some(*l);
            }
            match p.rfind('/') {
                Some(0) | None => break None,
                Some(i) => p.truncate(i),
            }
        };
        Problem {
            location,
            path,
            message,
        }
    }

    fn decode_singleton(
        &mut self,
        kind: Kind,
        value: Value,
        problems: &mut Vec<Problem>,
    ) -> Option<Value> {
        let pointer = format!("/{}", kind.section());
        let ok = match kind {
            Kind::Organisation => {
                self.check::<crate::directory::Organisation>(&pointer, kind.section(), &value)
            }
            Kind::Limits => {
                self.check::<crate::directory::LimitSettings>(&pointer, kind.section(), &value)
            }
            Kind::SmtpRelay => {
                self.check::<crate::directory::SmtpRelay>(&pointer, kind.section(), &value)
            }
            _ => Ok(()),
        };
        match ok {
            Ok(()) => Some(value),
            Err(p) => {
                problems.push(p);
                None
            }
        }
    }

    fn decode_list(
        &mut self,
        kind: Kind,
        value: Value,
        problems: &mut Vec<Problem>,
    ) -> Option<Value> {
        let section = kind.section();
        let Value::Array(items) = value else {
            problems.push(self.problem_at(
                &format!("/{section}"),
                section.to_owned(),
                "must be a list (each entry starts with `- `)".into(),
            ));
            return None;
        };
        let field = kind.identity_field().unwrap_or("id");
        let mut good = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let pointer = format!("/{section}/{i}");
            let mut id = item
                .get(field)
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_default();
            // An API key is usually identified by its secret alone (`SG.<id>.<secret>`), or by
            // nothing but its name when the secret is missing or malformed.
            if kind == Kind::ApiKey && id.is_empty() {
                let derived = item
                    .get("secret")
                    .and_then(Value::as_str)
                    .and_then(crate::directory::api_key_id);
                let name = item.get("name").and_then(Value::as_str);
                id = derived.or(name).unwrap_or_default().to_owned();
            }
            let label = if id.is_empty() {
                format!("{section}[{i}]")
            } else {
                format!("{section}[{id}]")
            };
            let result = match kind {
                Kind::Domain => self.check::<crate::directory::Domain>(&pointer, &label, &item),
                Kind::OrgUnit => self.check::<crate::directory::OrgUnit>(&pointer, &label, &item),
                Kind::User => self.check::<crate::directory::User>(&pointer, &label, &item),
                Kind::Group => self.check::<crate::directory::Group>(&pointer, &label, &item),
                Kind::Project => self.check::<crate::directory::Project>(&pointer, &label, &item),
                Kind::OAuthClient => {
                    self.check::<crate::directory::OAuthClient>(&pointer, &label, &item)
                }
                Kind::ServiceAccount => {
                    self.check::<crate::directory::ServiceAccount>(&pointer, &label, &item)
                }
                Kind::DelegationGrant => {
                    self.check::<crate::directory::DelegationGrant>(&pointer, &label, &item)
                }
                Kind::ApiKey => self.check::<crate::directory::ApiKey>(&pointer, &label, &item),
                Kind::Role => self.check::<crate::directory::Role>(&pointer, &label, &item),
                Kind::Policy => self.check::<crate::directory::Policy>(&pointer, &label, &item),
                Kind::Smarthost => {
                    self.check::<crate::directory::Smarthost>(&pointer, &label, &item)
                }
                Kind::Organisation | Kind::Limits | Kind::SmtpRelay => Ok(()),
            };
            // API keys may be identified by their secret only; the identity is derived later.
            let key = (kind, id.clone());
            if !id.is_empty() {
                if self.entries.contains_key(&key) {
                    problems.push(self.problem_at(
                        &format!("{pointer}/{field}"),
                        label.clone(),
                        format!("`{id}` is named twice in {section}; merge the two entries"),
                    ));
                    continue;
                }
                self.entries.insert(key.clone(), i);
            }
            match result {
                Ok(()) => good.push(item),
                Err(p) => {
                    problems.push(p);
                    self.undecoded.insert(key);
                }
            }
        }
        Some(Value::Array(good))
    }

    /// Decodes `value` as `T`, reporting the first problem with its path and position.
    fn check<T: DeserializeOwned>(
        &self,
        pointer: &str,
        label: &str,
        value: &Value,
    ) -> Result<(), Problem> {
        let mut track = serde_path_to_error::Track::new();
        let de = serde_path_to_error::Deserializer::new(value, &mut track);
        match T::deserialize(de) {
            Ok(_) => Ok(()),
            Err(e) => {
                let path = track.path();
                let mut segments: Vec<String> = path
                    .iter()
                    .filter_map(|s| match s {
                        serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                        serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                        serde_path_to_error::Segment::Enum { variant } => Some(variant.clone()),
                        serde_path_to_error::Segment::Unknown => None,
                    })
                    .collect();
                let mut message = e.to_string();
                // "unknown field `x`, expected ...": the problem is the entry holding x (its
                // path), the position is x itself, and the message names the field meant.
                let mut unknown = None;
                if let Some(rest) = message.strip_prefix("unknown field `")
                    && let Some((name, expected)) = rest.split_once('`')
                {
                    if segments.last().map(String::as_str) == Some(name) {
                        segments.pop();
                    }
                    unknown = Some(name.to_owned());
                    message = unknown_field_message(name, expected);
                }
                let shown = if segments.is_empty() {
                    label.to_owned()
                } else {
                    format!("{label}.{}", segments.join("."))
                };
                segments.extend(unknown);
                let rel = segments.join("/");
                let full = if rel.is_empty() {
                    pointer.to_owned()
                } else {
                    format!("{pointer}/{rel}")
                };
                Err(self.problem_at(&full, shown, message))
            }
        }
    }
}

/// `unknown field "stauts" (did you mean "status"?)`, from serde's `, expected one of `a`,
/// `b`` tail; without a close name, the fields that exist.
fn unknown_field_message(name: &str, expected: &str) -> String {
    let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let closest = known
        .iter()
        .map(|k| (edit_distance(&name.to_ascii_lowercase(), k), *k))
        .filter(|(d, k)| *d <= 2.min(k.len().saturating_sub(1)).max(1))
        .min_by_key(|(d, _)| *d);
    match closest {
        Some((_, k)) => format!("unknown field \"{name}\" (did you mean \"{k}\"?)"),
        None if known.is_empty() => {
            format!("unknown field \"{name}\" (this entry takes no fields)")
        }
        None => format!(
            "unknown field \"{name}\"; the fields are: {}",
            known.join(", ")
        ),
    }
}

/// Edit distance counting a swap of two neighbouring letters as one edit (optimal string
/// alignment): `stauts` is one edit from `status`.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    if let Some(first) = d.first_mut() {
        for (j, cell) in first.iter_mut().enumerate() {
            *cell = j;
        }
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

fn loc(m: &saphyr::Marker) -> Location {
    Location {
        line: m.line(),
        column: m.col() + 1,
    }
}

/// Converts a marked YAML node to JSON, recording the position of every node under its pointer.
fn to_json(
    node: &MarkedYaml<'_>,
    pointer: &str,
    locations: &mut HashMap<String, Location>,
    problems: &mut Vec<Problem>,
) -> Value {
    locations
        .entry(pointer.to_owned())
        .or_insert(loc(&node.span.start));
    match &node.data {
        YamlData::Value(s) => scalar(s),
        YamlData::Representation(s, _, _) => Value::String(s.to_string()),
        YamlData::Sequence(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, n)| to_json(n, &format!("{pointer}/{i}"), locations, problems))
                .collect(),
        ),
        YamlData::Mapping(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map.iter() {
                let key = match &k.data {
                    YamlData::Value(Scalar::String(s)) => s.to_string(),
                    YamlData::Value(other) => match scalar(other) {
                        Value::String(s) => s,
                        v => v.to_string(),
                    },
                    _ => {
                        problems.push(Problem {
                            location: Some(loc(&k.span.start)),
                            path: pointer.to_owned(),
                            message: "mapping keys must be plain words".into(),
                        });
                        continue;
                    }
                };
                let child = format!("{pointer}/{key}");
                // The key's own position is the most useful place to point at.
                locations.insert(child.clone(), loc(&k.span.start));
                let value = to_json(v, &child, locations, problems);
                out.insert(key, value);
            }
            Value::Object(out)
        }
        YamlData::Tagged(_, inner) => to_json(inner, pointer, locations, problems),
        YamlData::Alias(_) | YamlData::BadValue => {
            problems.push(Problem {
                location: Some(loc(&node.span.start)),
                path: pointer.to_owned(),
                message: "YAML aliases and unresolvable values are not supported here".into(),
            });
            Value::Null
        }
    }
}

fn scalar(s: &Scalar<'_>) -> Value {
    match s {
        Scalar::Null => Value::Null,
        Scalar::Boolean(b) => Value::Bool(*b),
        Scalar::Integer(i) => Value::from(*i),
        Scalar::FloatingPoint(f) => serde_json::Number::from_f64(f.into_inner())
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Scalar::String(s) => Value::String(s.to_string()),
    }
}

/// Serialises a directory as a directory file.
pub fn to_yaml(dir: &Directory) -> String {
    let value = serde_json::to_value(dir).unwrap_or(Value::Null);
    let mut out = String::from("# Mailgate directory, exported. Secrets appear only as hashes.\n");
    if let Value::Object(sections) = value {
        for kind in Kind::ALL {
            if let Some(v) = sections.get(kind.section()) {
                out.push_str(kind.section());
                out.push(':');
                write_yaml(&mut out, v, 2, true);
            }
        }
    }
    out
}

/// A small, deterministic YAML writer for JSON values (block style, quoted strings where needed).
fn write_yaml(out: &mut String, v: &Value, indent: usize, after_key: bool) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if m.is_empty() => out.push_str(" {}\n"),
        Value::Array(a) if a.is_empty() => out.push_str(" []\n"),
        Value::Object(m) => {
            if after_key {
                out.push('\n');
            }
            let mut first = true;
            for (k, val) in m {
                if !first || after_key {
                    out.push_str(&pad);
                }
                first = false;
                out.push_str(&yaml_key(k));
                out.push(':');
                write_yaml(out, val, indent + 2, true);
            }
        }
        Value::Array(a) => {
            if a.iter().all(|x| !x.is_object() && !x.is_array()) {
                out.push_str(" [");
                let items: Vec<String> = a.iter().map(yaml_scalar).collect();
                out.push_str(&items.join(", "));
                out.push_str("]\n");
                return;
            }
            out.push('\n');
            for item in a {
                out.push_str(&pad);
                out.push_str("- ");
                write_yaml(out, item, indent + 2, false);
            }
        }
        scalar => {
            if after_key {
                out.push(' ');
            }
            out.push_str(&yaml_scalar(scalar));
            out.push('\n');
        }
    }
}

fn yaml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_owned()
    } else {
        Value::String(k.to_owned()).to_string()
    }
}

fn yaml_scalar(v: &Value) -> String {
    match v {
        Value::String(s) if is_plain_safe(s) => s.clone(),
        // JSON string syntax is valid YAML double-quoted syntax.
        Value::String(s) => Value::String(s.clone()).to_string(),
        other => other.to_string(),
    }
}

/// Whether a string can be written unquoted and still read back as the same string.
fn is_plain_safe(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    let keyword = matches!(
        lower.as_str(),
        "true" | "false" | "null" | "~" | "yes" | "no" | "on" | "off" | "y" | "n"
    );
    !s.is_empty()
        && !keyword
        && s.parse::<f64>().is_err()
        && !s.starts_with(['-', '.', '@', '`'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '@' | '+' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_small_file() {
        let f = OrgFile::parse(
            "domains: [{name: example.com, verified: true}]\nusers:\n  - email: a@example.com\n",
        )
        .unwrap();
        assert_eq!(f.directory.users.len(), 1);
        assert!(f.sections.contains(&Kind::User));
        assert_eq!(
            f.locate(Kind::User, "a@example.com", "email").unwrap().line,
            3
        );
    }

    #[test]
    fn reports_every_bad_entry_with_its_line() {
        let src = "users:\n  - email: a@example.com\n    status: suspend\n  - email: b@example.com\n    colour: red\nprojects:\n  - id: p\n";
        let problems = OrgFile::parse(src).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert_eq!(problems[0].location.unwrap().line, 3);
        assert!(problems[0].path.ends_with("status"), "{:?}", problems[0]);
        assert_eq!(problems[1].location.unwrap().line, 5);
        assert!(
            problems[1]
                .message
                .starts_with("unknown field \"colour\"; the fields are: email, "),
            "{:?}",
            problems[1]
        );
        assert_eq!(problems[1].path, "users[b@example.com]");
        assert_eq!(problems[2].location.unwrap().line, 7);
        assert!(problems[2].message.contains("missing field `number`"));
    }

    #[test]
    fn duplicate_identities_are_reported() {
        let problems =
            OrgFile::parse("users:\n  - email: a@example.com\n  - email: a@example.com\n")
                .unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].location.unwrap().line, 3);
    }

    #[test]
    fn yaml_syntax_errors_have_a_line() {
        let problems = OrgFile::parse("users:\n  - email: [a\n").unwrap_err();
        assert!(problems[0].location.is_some());
        // No empty field path before the message, and the parser's own words after it.
        let shown = problems[0].in_file("org.yaml");
        assert!(shown.starts_with("org.yaml:"), "{shown}");
        assert!(!shown.contains(": :"), "{shown}");
        let (_, msg) = shown.split_once(": not valid YAML: ").expect(&shown);
        assert!(msg.len() > 5, "{shown}");
    }

    /// A misspelt field names the entry once and the field meant, at the misspelt key.
    #[test]
    fn unknown_fields_suggest_the_field_meant() {
        let src = "users:\n  - email: x@example.com\n    stauts: suspended\n    limits:\n      messages_per_dya: 5\n";
        let problems = OrgFile::parse(src).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        let p = &problems[0];
        assert_eq!(p.path, "users[x@example.com]");
        assert_eq!(
            p.message,
            "unknown field \"stauts\" (did you mean \"status\"?)"
        );
        assert_eq!(p.location, Some(Location { line: 3, column: 5 }));
        assert_eq!(
            p.in_file("org.yaml"),
            "org.yaml:3:5: users[x@example.com]: unknown field \"stauts\" (did you mean \"status\"?)"
        );
        let nested = OrgFile::parse(
            "users:\n  - email: x@example.com\n    limits:\n      messages_per_dya: 5\n",
        )
        .unwrap_err();
        assert_eq!(nested[0].path, "users[x@example.com].limits");
        assert!(
            nested[0]
                .message
                .contains("did you mean \"messages_per_day\""),
            "{:?}",
            nested[0]
        );
        assert_eq!(nested[0].location.map(|l| l.line), Some(4));
        assert_eq!(edit_distance("stauts", "status"), 1);
        assert!(edit_distance("colour", "email") > 2);
    }

    #[test]
    fn export_parses_back_to_the_same_directory() {
        let src = "organisation: {name: \"Ex: ample\"}\nroles: [{name: \"true\", permissions: [\"1.5\", \"-x\", \"@a\", \"a b\"]}]\ndomains: [{name: example.com, verified: true}]\nusers:\n  - email: a@example.com\n    display_name: \"O'Neil: \\\"A\\\"\"\n    aliases: [x@example.com]\n    send_as: [{email: s@example.com, status: pending}]\n    limits: {messages_per_day: 5, on_exceed: {daily_messages: hold}}\npolicies:\n  - id: p1\n    applies_to: {org_units: [/c]}\n    rule: {kind: allow_recipient_domains, domains: [a.com]}\n";
        let f = OrgFile::parse(src).unwrap();
        let yaml = to_yaml(&f.directory);
        let back = OrgFile::parse(&yaml).unwrap_or_else(|p| panic!("{yaml}\n{p:#?}"));
        assert_eq!(back.directory, f.directory, "{yaml}");
    }
}
