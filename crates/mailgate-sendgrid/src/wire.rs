//! The mail/send body as typed structs, read with a bounded memory cost.
//!
//! A `serde_json::Value` tree costs 32 bytes and an allocation per JSON value, so 30 MB of
//! `[0,0,...]` became 1.7 GB. Here every field is a typed slot that keeps only what validation
//! needs, and every list keeps at most a fixed number of items (SendGrid's own limits where it
//! has them), counting the rest without keeping them:
//!
//! - [`Loose`]: a scalar as it came, so that a value of the wrong type still gets SendGrid's
//!   message for that field rather than a parse error; an array or object where a scalar was
//!   expected is skipped (`Array` / `Object`), not kept.
//! - [`Obj`]: an object read into a struct, or what came instead.
//! - [`List`]: an array, the first `CAP` items kept, all counted.
//! - [`StrMap`]: a `{string: value}` object, the first `CAP` entries kept, all counted and sized.
//! - [`Json`]: any JSON value (`dynamic_template_data`), kept as a tree up to a size.
//!
//! On top of the caps, [`parse`] charges every kept item to a byte budget for the whole request
//! (a thread-local, since serde_json parses on the calling thread and derived `Deserialize`
//! cannot carry context): past it, the request is refused as too large instead of growing.
//! Keys not listed are skipped unread (`sections`, `tracking_settings`, legacy keys).

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Bytes of memory one request's parsed form may keep (strings, items): about the 30 MiB
/// request limit, so that a request costs at most about twice its size while it is parsed.
pub const PARSE_BUDGET_BYTES: usize = 32 * 1024 * 1024;

/// Most nodes a `dynamic_template_data` value may have (one personalization).
pub const MAX_TEMPLATE_DATA_NODES: usize = 10_000;

thread_local! {
    /// Bytes the parse in progress on this thread may still keep (`None`: no parse).
    static REMAINING: Cell<Option<usize>> = const { Cell::new(None) };
    /// Set when a parse ran out of budget.
    static EXHAUSTED: Cell<bool> = const { Cell::new(false) };
}

/// The message that ends a parse over budget (the error text itself is not shown).
const OVER_BUDGET: &str = "request over the parse budget";

/// Charges `n` bytes to the parse in progress; an error when the budget is spent.
fn charge<E: de::Error>(n: usize) -> Result<(), E> {
    REMAINING.with(|r| match r.get() {
        None => Ok(()),
        Some(left) if left >= n => {
            r.set(Some(left - n));
            Ok(())
        }
        Some(_) => {
            EXHAUSTED.with(|e| e.set(true));
            Err(E::custom(OVER_BUDGET))
        }
    })
}

/// Why a body did not parse.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ParseError {
    /// Not JSON, or JSON that is not an object: what is wrong, with serde's line and column.
    Syntax(String),
    /// Keeping it would pass the parse budget.
    OverBudget,
}

/// Parses a mail/send body within `budget` bytes of kept memory.
/// Returns the request and the bytes its kept form was charged.
pub(crate) fn parse(bytes: &[u8], budget: usize) -> Result<(RawMail, usize), ParseError> {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            REMAINING.with(|r| r.set(None));
            EXHAUSTED.with(|e| e.set(false));
        }
    }
    REMAINING.with(|r| r.set(Some(budget)));
    EXHAUSTED.with(|e| e.set(false));
    let _reset = Reset;
    let parsed = serde_json::from_slice::<Obj<RawMail>>(bytes);
    if EXHAUSTED.with(Cell::get) {
        return Err(ParseError::OverBudget);
    }
    let left = REMAINING.with(Cell::get).unwrap_or(0);
    match parsed {
        Ok(Obj::Ok(m)) => Ok((*m, budget.saturating_sub(left))),
        Ok(_) => Err(ParseError::Syntax(
            "the body is JSON but not an object: send one JSON object".into(),
        )),
        Err(e) => Err(ParseError::Syntax(json_problem(&e))),
    }
}

/// What is wrong with a body that is not JSON, as a client can act on it: serde's words with
/// the line and column.
pub(crate) fn json_problem(e: &serde_json::Error) -> String {
    match e.classify() {
        serde_json::error::Category::Eof => {
            format!("the JSON ends too early ({e}): send the whole body")
        }
        serde_json::error::Category::Io => format!("the body could not be read ({e})"),
        serde_json::error::Category::Syntax | serde_json::error::Category::Data => {
            format!("the body is not valid JSON: {e}")
        }
    }
}

/// A JSON scalar as it came; arrays and objects are skipped, not kept.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum Loose {
    /// The key was not there.
    #[default]
    Absent,
    Null,
    Bool(bool),
    Int(i64),
    /// A number that is not an `i64`.
    Float(f64),
    Str(String),
    /// An array (its content skipped).
    Array,
    /// An object (its content skipped).
    Object,
}

impl Loose {
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Loose::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Absent or `null`.
    pub(crate) fn is_none(&self) -> bool {
        matches!(self, Loose::Absent | Loose::Null)
    }

    /// How SendGrid's messages show a value ("you provided ...").
    pub(crate) fn shown(&self) -> String {
        match self {
            Loose::Absent | Loose::Null => "null".into(),
            Loose::Bool(b) => b.to_string(),
            Loose::Int(n) => n.to_string(),
            Loose::Float(f) => f.to_string(),
            Loose::Str(s) => Value::String(s.clone()).to_string(),
            Loose::Array => "[...]".into(),
            Loose::Object => "{...}".into(),
        }
    }
}

struct LooseVisitor;

impl<'de> Visitor<'de> for LooseVisitor {
    type Value = Loose;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Loose, E> {
        Ok(Loose::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Loose, E> {
        Ok(Loose::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Loose, E> {
        Ok(Loose::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Loose, E> {
        Ok(Loose::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Loose, E> {
        Ok(i64::try_from(v).map_or(Loose::Float(v as f64), Loose::Int))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Loose, E> {
        Ok(Loose::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Loose, E> {
        charge(v.len() + 32)?;
        Ok(Loose::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Loose, E> {
        charge(v.len() + 32)?;
        Ok(Loose::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Loose::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Loose::Object)
    }
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Loose, D::Error> {
        d.deserialize_any(LooseVisitor)
    }
}

/// An object read as `T`, or what came instead (absent, `null`, a scalar, an array).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum Obj<T> {
    #[default]
    Absent,
    Ok(Box<T>),
    Wrong(Loose),
}

impl<T> Obj<T> {
    pub(crate) fn get(&self) -> Option<&T> {
        match self {
            Obj::Ok(t) => Some(t),
            _ => None,
        }
    }

    /// Absent or `null`.
    pub(crate) fn is_none(&self) -> bool {
        matches!(self, Obj::Absent | Obj::Wrong(Loose::Null))
    }
}

struct ObjVisitor<T>(PhantomData<T>);

/// Implements the scalar visits of a visitor whose value has a `Wrong(Loose)` variant.
macro_rules! wrong_scalars {
    ($out:ty) => {
        fn visit_unit<E: de::Error>(self) -> Result<$out, E> {
            Ok(<$out>::Wrong(Loose::Null))
        }
        fn visit_none<E: de::Error>(self) -> Result<$out, E> {
            Ok(<$out>::Wrong(Loose::Null))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<$out, E> {
            LooseVisitor.visit_bool(v).map(<$out>::Wrong)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<$out, E> {
            LooseVisitor.visit_i64(v).map(<$out>::Wrong)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<$out, E> {
            LooseVisitor.visit_u64(v).map(<$out>::Wrong)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<$out, E> {
            LooseVisitor.visit_f64(v).map(<$out>::Wrong)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<$out, E> {
            LooseVisitor.visit_str(v).map(<$out>::Wrong)
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<$out, E> {
            LooseVisitor.visit_string(v).map(<$out>::Wrong)
        }
    };
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjVisitor<T> {
    type Value = Obj<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }
    wrong_scalars!(Obj<T>);
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Obj<T>, A::Error> {
        LooseVisitor.visit_seq(seq).map(Obj::Wrong)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
        charge(std::mem::size_of::<T>())?;
        T::deserialize(de::value::MapAccessDeserializer::new(map)).map(|t| Obj::Ok(Box::new(t)))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Obj<T>, D::Error> {
        d.deserialize_any(ObjVisitor(PhantomData))
    }
}

/// An array: its first `CAP` items kept, all of them counted.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum List<T, const CAP: usize> {
    #[default]
    Absent,
    Ok {
        items: Vec<T>,
        /// Items in the request (`items` holds the first `CAP`).
        len: usize,
    },
    Wrong(Loose),
}

impl<T, const CAP: usize> List<T, CAP> {
    /// Absent or `null`.
    pub(crate) fn is_none(&self) -> bool {
        matches!(self, List::Absent | List::Wrong(Loose::Null))
    }
}

struct ListVisitor<T, const CAP: usize>(PhantomData<T>);

impl<'de, T: Deserialize<'de>, const CAP: usize> Visitor<'de> for ListVisitor<T, CAP> {
    type Value = List<T, CAP>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }
    wrong_scalars!(List<T, CAP>);
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<List<T, CAP>, A::Error> {
        LooseVisitor.visit_map(map).map(List::Wrong)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List<T, CAP>, A::Error> {
        let mut items = Vec::new();
        let mut len = 0usize;
        loop {
            if len < CAP {
                charge(std::mem::size_of::<T>())?;
                match seq.next_element::<T>()? {
                    Some(t) => items.push(t),
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            len += 1;
        }
        Ok(List::Ok { items, len })
    }
}

impl<'de, T: Deserialize<'de>, const CAP: usize> Deserialize<'de> for List<T, CAP> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<List<T, CAP>, D::Error> {
        d.deserialize_any(ListVisitor::<T, CAP>(PhantomData))
    }
}

/// A `{string: value}` object (headers, substitutions, custom_args): the first `CAP` entries
/// kept, all of them counted and measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum StrMap<const CAP: usize> {
    #[default]
    Absent,
    Ok {
        entries: Vec<(String, Loose)>,
        /// Entries in the request.
        len: usize,
        /// Bytes of every key and string value.
        bytes: usize,
        /// Whether every value is a string.
        all_strings: bool,
    },
    Wrong(Loose),
}

impl<const CAP: usize> StrMap<CAP> {
    /// Absent or `null`.
    pub(crate) fn is_none(&self) -> bool {
        matches!(self, StrMap::Absent | StrMap::Wrong(Loose::Null))
    }
}

/// A map value that is measured but not kept.
struct Measured {
    string_len: Option<usize>,
}

impl<'de> Deserialize<'de> for Measured {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Measured, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Measured;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Measured, E> {
                Ok(Measured {
                    string_len: Some(v.len()),
                })
            }
            fn visit_unit<E: de::Error>(self) -> Result<Measured, E> {
                Ok(Measured { string_len: None })
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Measured, E> {
                Ok(Measured { string_len: None })
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Measured, E> {
                Ok(Measured { string_len: None })
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Measured, E> {
                Ok(Measured { string_len: None })
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Measured, E> {
                Ok(Measured { string_len: None })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Measured, A::Error> {
                LooseVisitor.visit_seq(seq)?;
                Ok(Measured { string_len: None })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Measured, A::Error> {
                LooseVisitor.visit_map(map)?;
                Ok(Measured { string_len: None })
            }
        }
        d.deserialize_any(V)
    }
}

/// A map key measured but not kept.
struct KeyLen(usize);

impl<'de> Deserialize<'de> for KeyLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<KeyLen, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyLen;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyLen, E> {
                Ok(KeyLen(v.len()))
            }
        }
        d.deserialize_str(V)
    }
}

struct StrMapVisitor<const CAP: usize>;

impl<'de, const CAP: usize> Visitor<'de> for StrMapVisitor<CAP> {
    type Value = StrMap<CAP>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }
    wrong_scalars!(StrMap<CAP>);
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<StrMap<CAP>, A::Error> {
        LooseVisitor.visit_seq(seq).map(StrMap::Wrong)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrMap<CAP>, A::Error> {
        let mut entries = Vec::new();
        let (mut len, mut bytes, mut all_strings) = (0usize, 0usize, true);
        loop {
            if len < CAP {
                let Some(k) = map.next_key::<String>()? else {
                    break;
                };
                charge(k.len() + 64)?;
                let v: Loose = map.next_value()?;
                bytes += k.len();
                match &v {
                    Loose::Str(s) => bytes += s.len(),
                    _ => all_strings = false,
                }
                entries.push((k, v));
            } else {
                let Some(KeyLen(k)) = map.next_key::<KeyLen>()? else {
                    break;
                };
                let v: Measured = map.next_value()?;
                bytes += k;
                match v.string_len {
                    Some(n) => bytes += n,
                    None => all_strings = false,
                }
            }
            len += 1;
        }
        Ok(StrMap::Ok {
            entries,
            len,
            bytes,
            all_strings,
        })
    }
}

impl<'de, const CAP: usize> Deserialize<'de> for StrMap<CAP> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<StrMap<CAP>, D::Error> {
        d.deserialize_any(StrMapVisitor::<CAP>)
    }
}

/// Any JSON value kept as a tree of at most [`MAX_TEMPLATE_DATA_NODES`] nodes (each charged
/// to the parse budget); `TooBig` past that (the rest skipped).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum Json {
    #[default]
    Absent,
    Value(Value),
    TooBig,
}

/// Builds a `Value`, counting nodes against a limit.
struct CountedSeed<'a> {
    nodes: &'a Cell<usize>,
}

impl<'de> DeserializeSeed<'de> for CountedSeed<'_> {
    type Value = Option<Value>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Value>, D::Error> {
        d.deserialize_any(self)
    }
}

impl CountedSeed<'_> {
    /// Counts one node; false past the limit.
    fn count<E: de::Error>(&self, extra: usize) -> Result<bool, E> {
        let n = self.nodes.get() + 1;
        self.nodes.set(n);
        if n > MAX_TEMPLATE_DATA_NODES {
            return Ok(false);
        }
        charge(std::mem::size_of::<Value>() + extra)?;
        Ok(true)
    }
}

impl<'de> Visitor<'de> for CountedSeed<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<Value>, E> {
        Ok(self.count(0)?.then_some(Value::Null))
    }
    fn visit_none<E: de::Error>(self) -> Result<Option<Value>, E> {
        self.visit_unit()
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Option<Value>, E> {
        Ok(self.count(0)?.then_some(Value::Bool(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<Value>, E> {
        Ok(self.count(0)?.then(|| Value::from(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<Value>, E> {
        Ok(self.count(0)?.then(|| Value::from(v)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Option<Value>, E> {
        Ok(self.count(0)?.then(|| Value::from(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<Value>, E> {
        Ok(self.count(v.len())?.then(|| Value::String(v.to_owned())))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<Value>, A::Error> {
        let mut out = self.count(0)?.then(Vec::new);
        while let Some(item) = seq.next_element_seed(CountedSeed { nodes: self.nodes })? {
            match (out.as_mut(), item) {
                (Some(list), Some(v)) => list.push(v),
                _ => out = None,
            }
        }
        Ok(out.map(Value::Array))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Value>, A::Error> {
        let mut out = self.count(0)?.then(serde_json::Map::new);
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value_seed(CountedSeed { nodes: self.nodes })?;
            if !self.count(k.len())? {
                out = None;
            }
            match (out.as_mut(), v) {
                (Some(m), Some(v)) => {
                    m.insert(k, v);
                }
                _ => out = None,
            }
        }
        Ok(out.map(Value::Object))
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        let nodes = Cell::new(0);
        let seed = CountedSeed { nodes: &nodes };
        Ok(match seed.deserialize(d)? {
            Some(v) => Json::Value(v),
            None => Json::TooBig,
        })
    }
}

/// `{email, name}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct RawAddr {
    pub(crate) email: Loose,
    pub(crate) name: Loose,
}

/// Recipients kept per list of one personalization: one past SendGrid's total of 1,000, so the
/// total check still fires; the rest are counted.
pub(crate) const RECIPIENTS_KEPT: usize = 1001;

/// One personalization.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct RawPersonalization {
    pub(crate) to: List<Obj<RawAddr>, RECIPIENTS_KEPT>,
    pub(crate) cc: List<Obj<RawAddr>, RECIPIENTS_KEPT>,
    pub(crate) bcc: List<Obj<RawAddr>, RECIPIENTS_KEPT>,
    pub(crate) from: Obj<RawAddr>,
    pub(crate) subject: Loose,
    pub(crate) headers: StrMap<1000>,
    pub(crate) substitutions: StrMap<10_000>,
    pub(crate) dynamic_template_data: Json,
    pub(crate) custom_args: StrMap<0>,
    pub(crate) send_at: Loose,
}

/// One content block.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct RawContent {
    #[serde(rename = "type")]
    pub(crate) kind: Loose,
    pub(crate) value: Loose,
}

/// One attachment.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct RawAttachment {
    pub(crate) content: Loose,
    pub(crate) filename: Loose,
    #[serde(rename = "type")]
    pub(crate) kind: Loose,
    pub(crate) disposition: Loose,
    pub(crate) content_id: Loose,
}

/// `asm`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct RawAsm {
    pub(crate) group_id: Loose,
}

/// `{"enable": ...}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct RawEnable {
    pub(crate) enable: Loose,
}

/// `mail_settings` (only sandbox mode matters to Mailgate).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct RawMailSettings {
    pub(crate) sandbox_mode: Obj<RawEnable>,
}

/// Most personalizations kept (SendGrid's limit; more are counted for its message).
pub(crate) const PERSONALIZATIONS_KEPT: usize = 1000;
/// Most content blocks (Mailgate's limit: SendGrid's clients send one or two).
pub(crate) const CONTENT_KEPT: usize = 100;
/// Most attachments (Mailgate's limit).
pub(crate) const ATTACHMENTS_KEPT: usize = 1000;
/// Categories kept (SendGrid allows 10; one more is kept so the count is known).
pub(crate) const CATEGORIES_KEPT: usize = 11;

/// The mail/send body.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct RawMail {
    pub(crate) personalizations: List<Obj<RawPersonalization>, PERSONALIZATIONS_KEPT>,
    pub(crate) from: Obj<RawAddr>,
    pub(crate) reply_to: Obj<RawAddr>,
    pub(crate) reply_to_list: List<Obj<RawAddr>, RECIPIENTS_KEPT>,
    pub(crate) subject: Loose,
    pub(crate) content: List<Obj<RawContent>, CONTENT_KEPT>,
    pub(crate) attachments: List<Obj<RawAttachment>, ATTACHMENTS_KEPT>,
    pub(crate) headers: StrMap<1000>,
    pub(crate) categories: List<Loose, CATEGORIES_KEPT>,
    pub(crate) custom_args: StrMap<0>,
    pub(crate) send_at: Loose,
    pub(crate) batch_id: Loose,
    pub(crate) ip_pool_name: Loose,
    pub(crate) asm: Obj<RawAsm>,
    pub(crate) mail_settings: Obj<RawMailSettings>,
    pub(crate) template_id: Loose,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn wrong_types_are_kept_as_what_came() {
        let m = parse(
            br#"{"from":"x","subject":null,"personalizations":{"a":1},"categories":[1,"a",[2]],"sections":{"x":[1,2,3]}}"#,
            1 << 20,
        )
        .unwrap()
        .0;
        assert_eq!(m.from, Obj::Wrong(Loose::Str("x".into())));
        assert_eq!(m.subject, Loose::Null);
        assert_eq!(m.personalizations, List::Wrong(Loose::Object));
        assert_eq!(
            m.categories,
            List::Ok {
                items: vec![Loose::Int(1), Loose::Str("a".into()), Loose::Array],
                len: 3
            }
        );
        assert_eq!(m.template_id, Loose::Absent);
        assert_eq!(
            parse(b"[1]", 1 << 20).unwrap_err(),
            ParseError::Syntax("the body is JSON but not an object: send one JSON object".into())
        );
        assert_eq!(
            parse(b"{", 1 << 20).unwrap_err(),
            ParseError::Syntax(
                "the JSON ends too early (EOF while parsing an object at line 1 column 1): send the whole body"
                    .into()
            )
        );
        assert_eq!(
            parse(b"{\n  \"from\": x}", 1 << 20).unwrap_err(),
            ParseError::Syntax(
                "the body is not valid JSON: expected value at line 2 column 11".into()
            )
        );
    }

    #[test]
    fn long_lists_are_counted_not_kept() {
        let mut body = String::from(r#"{"personalizations":["#);
        for i in 0..5000 {
            if i > 0 {
                body.push(',');
            }
            body.push_str("{}");
        }
        body.push_str("]}");
        let m = parse(body.as_bytes(), 1 << 20).unwrap().0;
        let List::Ok { items, len } = m.personalizations else {
            panic!()
        };
        assert_eq!((items.len(), len), (PERSONALIZATIONS_KEPT, 5000));
    }

    #[test]
    fn the_budget_bounds_what_is_kept() {
        let mut body = String::from(r#"{"headers":{"#);
        for i in 0..900 {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&format!(r#""X-{i}":"{}""#, "v".repeat(100)));
        }
        body.push_str("}}");
        assert!(parse(body.as_bytes(), 1 << 20).is_ok());
        assert_eq!(
            parse(body.as_bytes(), 50_000).unwrap_err(),
            ParseError::OverBudget
        );
        // The thread is left without a budget.
        assert!(REMAINING.with(Cell::get).is_none());
    }

    #[test]
    fn maps_are_measured_past_their_cap() {
        let m = parse(
            br#"{"custom_args":{"a":"bc","d":1},"headers":{"X-A":"1"}}"#,
            1 << 20,
        )
        .unwrap()
        .0;
        assert_eq!(
            m.custom_args,
            StrMap::Ok {
                entries: vec![],
                len: 2,
                bytes: 4,
                all_strings: false
            }
        );
        let StrMap::Ok { entries, .. } = m.headers else {
            panic!()
        };
        assert_eq!(entries, vec![("X-A".into(), Loose::Str("1".into()))]);
    }

    #[test]
    fn template_data_is_a_tree_up_to_a_size() {
        let m = parse(
            br#"{"personalizations":[{"dynamic_template_data":{"name":"A","n":[1,2]}}]}"#,
            1 << 20,
        )
        .unwrap()
        .0;
        let List::Ok { items, .. } = m.personalizations else {
            panic!()
        };
        assert_eq!(
            items[0].get().unwrap().dynamic_template_data,
            Json::Value(serde_json::json!({"name":"A","n":[1,2]}))
        );
        let big = format!(
            r#"{{"personalizations":[{{"dynamic_template_data":[{}0]}}]}}"#,
            "0,".repeat(MAX_TEMPLATE_DATA_NODES)
        );
        let m = parse(big.as_bytes(), 1 << 24).unwrap().0;
        let List::Ok { items, .. } = m.personalizations else {
            panic!()
        };
        assert_eq!(items[0].get().unwrap().dynamic_template_data, Json::TooBig);
    }
}
