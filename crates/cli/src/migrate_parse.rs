//! What `coffer migrate` reads: `.env` files, `KEY=VALUE` lines or `env -0` records on stdin, and
//! the `environment:` blocks of docker-compose files. Pure functions of the text, in the library
//! so the fuzz targets (`fuzz/`) run exactly what the binary runs.
//!
//! Values are held in `Zeroizing` buffers; a message names a line, never quotes it.

use anyhow::{bail, Result};
use saphyr_parser::{Event, Parser as YamlParser, ScalarStyle, ScanError, Span};
use zeroize::Zeroizing;

/// One `KEY=VALUE` found in the input, before any decision.
pub struct Item {
    /// The variable's name; `None` when the line could not be read (it is named by `location`).
    pub key: Option<String>,
    pub value: Found,
    /// "line 3", "record 2", "service app, line 12".
    pub location: String,
    /// The compose service, if any.
    pub service: Option<String>,
    /// How to remove the value from the cleaned copy.
    pub edit: Edit,
}

pub enum Found {
    Value(Zeroizing<String>),
    /// No value here: taken from the host environment (compose `- KEY`, `KEY:`; `.env` `KEY`).
    FromHost,
    /// Not usable; the message says why and never quotes the input.
    Problem(String),
}

pub enum Edit {
    None,
    /// Lines `first..=last` of a `.env` file; `prefix` is the indentation and any `export `.
    EnvLines {
        first: usize,
        last: usize,
        prefix: String,
        key: String,
    },
    /// Replace bytes `start..end` of a compose file; `block` allows a trailing comment.
    Yaml {
        start: usize,
        end: usize,
        replacement: String,
        block: bool,
    },
}

impl Item {
    pub fn problem(key: Option<String>, location: String, message: impl Into<String>) -> Self {
        Item { key, value: Found::Problem(message.into()), location, service: None, edit: Edit::None }
    }
}

// ---------------------------------------------------------------------------------------------
// .env files and stdin.

/// Keys as environment files write them: no blanks, quotes, `=` or `#`.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('#')
        && key.chars().all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '=' | '"' | '\'' | '`'))
}

/// Parses `.env` text: `KEY=VALUE` lines, `export ` prefixes, `#` comments and blank lines,
/// single-quoted (literal) and double-quoted (`\n \r \t \" \\ \$` escapes) values that may
/// span lines, unquoted values ending at ` #`. `${VAR}` is not expanded: values are stored as
/// written.
pub fn parse_env(text: &str) -> Vec<Item> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut items = Vec::new();
    let mut pos = 0;
    let mut line_no = 0;
    while pos < text.len() {
        let (line, next) = line_at(text, pos);
        let first = line_no;
        pos = next;
        line_no += 1;
        let location = format!("line {}", first + 1);
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = &line[..line.len() - trimmed.len()];
        let (rest, export) = match trimmed.strip_prefix("export") {
            Some(r) if r.starts_with([' ', '\t']) => (r.trim_start(), "export "),
            _ => (trimmed, ""),
        };
        let Some((raw_key, after)) = rest.split_once('=') else {
            // A bare word: a reference to the host's environment, or a stray line. Either way
            // it is named by its number only, since it may be a piece of a value.
            let value = if valid_key(rest.trim_end()) {
                Found::FromHost
            } else {
                Found::Problem("not KEY=VALUE; fix the line and re-run".into())
            };
            items.push(Item { key: None, value, location, service: None, edit: Edit::None });
            continue;
        };
        let key = raw_key.trim_end();
        if !valid_key(key) {
            items.push(Item::problem(
                None,
                location,
                "not KEY=VALUE (the key is empty or has blanks or quotes); fix the line and re-run",
            ));
            continue;
        }
        let after = after.trim_start_matches([' ', '\t']);
        // Where the value starts in `text`, to follow quoted values across lines.
        let value_start = offset_in(text, after);
        let (value, last) = match after.chars().next() {
            Some(q @ ('"' | '\'')) => match quoted(text, value_start + 1, q) {
                Some((value, end)) => {
                    let newlines = text[value_start..end].matches('\n').count();
                    let (tail, after_tail) = line_at(text, end);
                    let tail_ok = {
                        let t = tail.trim_start();
                        t.is_empty() || t.starts_with('#')
                    };
                    pos = after_tail;
                    line_no = first + newlines + 1;
                    if tail_ok {
                        (Found::Value(value), first + newlines)
                    } else {
                        (
                            Found::Problem(
                                "unexpected text after the closing quote; fix the line and re-run".into(),
                            ),
                            first + newlines,
                        )
                    }
                }
                None => (Found::Problem("the quote is never closed; fix the line and re-run".into()), first),
            },
            _ => {
                let end = after
                    .char_indices()
                    .find(|&(i, c)| c == '#' && i > 0 && after[..i].ends_with([' ', '\t']))
                    .map_or(after.len(), |(i, _)| i);
                (Found::Value(Zeroizing::new(after[..end].trim_end().to_owned())), first)
            }
        };
        items.push(Item {
            key: Some(key.to_owned()),
            value,
            location,
            service: None,
            edit: Edit::EnvLines { first, last, prefix: format!("{indent}{export}"), key: key.to_owned() },
        });
    }
    items
}

/// The line starting at byte `pos` (without its `\n` or `\r\n`) and where the next one starts.
fn line_at(text: &str, pos: usize) -> (&str, usize) {
    let end = text[pos..].find('\n').map_or(text.len(), |i| pos + i);
    let line = &text[pos..end];
    (line.strip_suffix('\r').unwrap_or(line), if end < text.len() { end + 1 } else { end })
}

/// Byte offset of `part`, a slice of `text`, in `text`.
fn offset_in(text: &str, part: &str) -> usize {
    part.as_ptr() as usize - text.as_ptr() as usize
}

/// Reads a quoted value whose first character is at byte `start`; returns it and the byte just
/// after the closing quote. Single quotes are literal; double quotes know `\n \r \t \" \\ \$`
/// (other escapes are kept as written).
fn quoted(text: &str, start: usize, quote: char) -> Option<(Zeroizing<String>, usize)> {
    let mut value = Zeroizing::new(String::with_capacity(text.len() - start));
    let mut chars = text[start..].char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            c if c == quote => return Some((value, start + i + 1)),
            '\\' if quote == '"' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, 'r')) => value.push('\r'),
                Some((_, 't')) => value.push('\t'),
                Some((_, e @ ('"' | '\\' | '$' | '\''))) => value.push(e),
                Some((_, e)) => {
                    value.push('\\');
                    value.push(e);
                }
                None => return None,
            },
            '\r' if text[start + i..].starts_with("\r\n") => {}
            c => value.push(c),
        }
    }
    None
}

/// `KEY=VALUE` on stdin: NUL-separated records (`env -0`, values taken as they are) when the
/// input has a NUL, else lines read like a `.env` file.
pub fn parse_stdin(text: &str) -> Vec<Item> {
    if !text.contains('\0') {
        return parse_env(text)
            .into_iter()
            .map(|mut item| {
                // Without a file there is nothing to clean; a bare word on stdin is most likely
                // a line of a value that spans lines.
                item.edit = Edit::None;
                if matches!(item.value, Found::FromHost) {
                    item.value = Found::Problem(
                        "no '=' on this line (part of a value that spans lines? pipe `env -0` instead); \
                         re-run"
                            .into(),
                    );
                }
                item
            })
            .collect();
    }
    let mut items = Vec::new();
    for (i, record) in text.split('\0').enumerate() {
        let record = if i == 0 { record.strip_prefix('\u{feff}').unwrap_or(record) } else { record };
        if record.is_empty() || record == "\n" {
            continue;
        }
        let location = format!("record {}", i + 1);
        match record.split_once('=') {
            Some((key, value)) if valid_key(key) => items.push(Item {
                key: Some(key.to_owned()),
                value: Found::Value(Zeroizing::new(value.to_owned())),
                location,
                service: None,
                edit: Edit::None,
            }),
            _ => items.push(Item::problem(None, location, "not KEY=VALUE; fix the input and re-run")),
        }
    }
    items
}

// ---------------------------------------------------------------------------------------------
// docker-compose files.

struct Node {
    kind: Kind,
    /// Byte offsets of the node's text (scalars: without block-scalar headers).
    start: usize,
    end: usize,
    /// 1-based line of the start.
    line: usize,
    /// Inside a flow collection (`[…]`, `{…}`), where a `#` comment cannot be added.
    flow: bool,
}

enum Kind {
    Scalar { text: Zeroizing<String>, style: ScalarStyle, tagged: bool },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
    Alias,
}

impl Node {
    fn str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// `KEY:` with nothing, `~` or `null`.
    fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { text, style: ScalarStyle::Plain, tagged: false }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }
}

/// Builds a node tree from the parser's events, with byte offsets into the text.
struct YamlReader<'a> {
    events: YamlParser<'a, saphyr_parser::StrInput<'a>>,
    text: &'a str,
    /// Byte offset of each character (and of the end).
    offsets: Vec<usize>,
}

const MAX_DEPTH: usize = 64;

impl<'a> YamlReader<'a> {
    fn new(text: &'a str) -> Self {
        let offsets = text.char_indices().map(|(b, _)| b).chain([text.len()]).collect();
        YamlReader { events: YamlParser::new_from_str(text), text, offsets }
    }

    fn next(&mut self) -> Result<(Event<'a>, Span)> {
        match self.events.next() {
            Some(Ok(e)) => Ok(e),
            Some(Err(e)) => Err(yaml_error(&e)),
            None => bail!("the file ended in the middle of the YAML document"),
        }
    }

    fn byte(&self, index: usize) -> usize {
        self.offsets.get(index).copied().unwrap_or(self.text.len())
    }

    /// The first document's root node, if any.
    fn document(&mut self) -> Result<Option<Node>> {
        loop {
            let (event, span) = self.next()?;
            match event {
                Event::StreamStart | Event::DocumentStart(_) | Event::Nothing => {}
                Event::StreamEnd | Event::DocumentEnd => return Ok(None),
                event => return self.node(event, span, false, 0).map(Some),
            }
        }
    }

    fn node(&mut self, event: Event<'a>, span: Span, flow: bool, depth: usize) -> Result<Node> {
        if depth > MAX_DEPTH {
            bail!("the YAML is nested more than {MAX_DEPTH} levels deep");
        }
        let start = self.byte(span.start.index());
        let line = span.start.line();
        let opens_flow = |s: &Self| s.text[start..].starts_with(['[', '{']);
        let (kind, end) = match event {
            Event::Scalar(text, style, _, tag) => {
                let kind =
                    Kind::Scalar { text: Zeroizing::new(text.into_owned()), style, tagged: tag.is_some() };
                (kind, self.byte(span.end.index()))
            }
            Event::Alias(_) => (Kind::Alias, self.byte(span.end.index())),
            Event::SequenceStart(..) => {
                let inner = flow || opens_flow(self);
                let mut items = Vec::new();
                let end = loop {
                    let (event, span) = self.next()?;
                    if event == Event::SequenceEnd {
                        break self.byte(span.end.index());
                    }
                    items.push(self.node(event, span, inner, depth + 1)?);
                };
                (Kind::Seq(items), end)
            }
            Event::MappingStart(..) => {
                let inner = flow || opens_flow(self);
                let mut pairs = Vec::new();
                let end = loop {
                    let (event, span) = self.next()?;
                    if event == Event::MappingEnd {
                        break self.byte(span.end.index());
                    }
                    let key = self.node(event, span, inner, depth + 1)?;
                    let (event, span) = self.next()?;
                    let value = self.node(event, span, inner, depth + 1)?;
                    pairs.push((key, value));
                };
                (Kind::Map(pairs), end)
            }
            _ => bail!("unexpected YAML structure at line {line}"),
        };
        Ok(Node { kind, start, end, line, flow })
    }
}

/// A YAML error by position; the scanner's message only when it cannot quote the input.
fn yaml_error(e: &ScanError) -> anyhow::Error {
    let m = e.marker();
    let info = e.info();
    if info.contains('`') || info.contains('\'') {
        anyhow::anyhow!("not valid YAML at line {} column {}; fix it and re-run", m.line(), m.col() + 1)
    } else {
        anyhow::anyhow!(
            "not valid YAML at line {} column {} ({info}); fix it and re-run",
            m.line(),
            m.col() + 1
        )
    }
}

/// End of a replaced region, before any trailing blanks and line breaks (kept as they are).
fn trim_end_at(text: &str, start: usize, end: usize) -> usize {
    start + text[start..end].trim_end_matches([' ', '\t', '\r', '\n']).len()
}

/// `KEY=` as a YAML scalar (quoted unless the key is plain letters, digits, `_`, `.`, `-`).
fn yaml_key_eq(key: &str) -> String {
    if key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) && !key.starts_with('-')
    {
        format!("{key}=")
    } else {
        format!("\"{}=\"", key.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// The `environment:` entries of every service of a compose file, and notes for the user.
pub fn parse_compose(text: &str) -> Result<(Vec<Item>, Vec<String>)> {
    let mut reader = YamlReader::new(text);
    let Some(root) = reader.document()? else {
        return Ok((Vec::new(), Vec::new()));
    };
    let Kind::Map(top) = root.kind else {
        bail!("this is not a compose file: its top level is not a mapping");
    };
    let Some((_, services)) = top.into_iter().find(|(k, _)| k.str() == Some("services")) else {
        bail!("this compose file has no `services:`");
    };
    let services = match services.kind {
        Kind::Map(services) => services,
        _ if services.is_null() => Vec::new(),
        _ => bail!("`services:` (line {}) is not a mapping of services", services.line),
    };
    let mut items = Vec::new();
    let mut notes = Vec::new();
    for (name, service) in services {
        let service_name = name.str().unwrap_or("?").to_owned();
        let Kind::Map(fields) = service.kind else { continue };
        for (field, value) in fields {
            match field.str() {
                Some("env_file") => notes.push(format!(
                    "service {service_name} also reads an env_file (line {}): migrate it too with --env-file",
                    field.line
                )),
                Some("environment") => environment(text, &service_name, value, &mut items),
                _ => {}
            }
        }
    }
    Ok((items, notes))
}

fn environment(text: &str, service: &str, env: Node, items: &mut Vec<Item>) {
    let at = |line: usize| format!("service {service}, line {line}");
    let mut push = |mut item: Item| {
        item.service = Some(service.to_owned());
        items.push(item);
    };
    match env.kind {
        Kind::Seq(entries) => {
            for entry in entries {
                let location = at(entry.line);
                let (text_of, style) = match &entry.kind {
                    Kind::Scalar { text, style, .. } => (text, *style),
                    Kind::Alias => {
                        push(Item::problem(
                            None,
                            location,
                            "a YAML alias: write the entry out as KEY=VALUE and re-run",
                        ));
                        continue;
                    }
                    _ => {
                        push(Item::problem(None, location, "not KEY=VALUE; fix the entry and re-run"));
                        continue;
                    }
                };
                let Some((key, value)) = text_of.split_once('=') else {
                    let key = text_of.as_str();
                    push(if valid_key(key) {
                        Item {
                            key: Some(key.to_owned()),
                            value: Found::FromHost,
                            location,
                            service: None,
                            edit: Edit::None,
                        }
                    } else {
                        Item::problem(None, location, "not KEY=VALUE; fix the entry and re-run")
                    });
                    continue;
                };
                if !valid_key(key) {
                    push(Item::problem(
                        None,
                        location,
                        "not KEY=VALUE (the key is empty or has blanks or quotes); fix the entry and re-run",
                    ));
                    continue;
                }
                if matches!(style, ScalarStyle::Literal | ScalarStyle::Folded) {
                    push(Item::problem(
                        Some(key.to_owned()),
                        location,
                        "written as a YAML block scalar (| or >): write it as `- KEY=VALUE` on one line, \
                         or in the map form, and re-run",
                    ));
                    continue;
                }
                push(Item {
                    key: Some(key.to_owned()),
                    value: Found::Value(Zeroizing::new(value.to_owned())),
                    location,
                    service: None,
                    edit: Edit::Yaml {
                        start: entry.start,
                        end: trim_end_at(text, entry.start, entry.end),
                        replacement: yaml_key_eq(key),
                        block: !entry.flow,
                    },
                });
            }
        }
        Kind::Map(pairs) => {
            for (key, value) in pairs {
                let location = at(key.line);
                let Some(name) = key.str().filter(|k| valid_key(k)) else {
                    let message = if key.str() == Some("<<") {
                        "a YAML merge key (<<): write the variables out in this service's environment \
                         and re-run"
                    } else {
                        "the key is not a variable name; fix the entry and re-run"
                    };
                    push(Item::problem(None, location, message));
                    continue;
                };
                let name = name.to_owned();
                if value.is_null() {
                    push(Item {
                        key: Some(name),
                        value: Found::FromHost,
                        location,
                        service: None,
                        edit: Edit::None,
                    });
                    continue;
                }
                let found = match value.kind {
                    Kind::Scalar { text: v, .. } => Found::Value(v),
                    Kind::Alias => {
                        push(Item::problem(
                            Some(name),
                            location,
                            "a YAML alias: write the value out and re-run",
                        ));
                        continue;
                    }
                    _ => {
                        push(Item::problem(
                            Some(name),
                            location,
                            "the value is not a string; fix the entry and re-run",
                        ));
                        continue;
                    }
                };
                push(Item {
                    key: Some(name),
                    value: found,
                    location,
                    service: None,
                    edit: Edit::Yaml {
                        start: key.end,
                        end: trim_end_at(text, key.end, value.end),
                        replacement: ": \"\"".into(),
                        block: !value.flow,
                    },
                });
            }
        }
        Kind::Alias => push(Item::problem(
            None,
            at(env.line),
            "`environment:` is a YAML alias: write the variables out in this service and re-run",
        )),
        Kind::Scalar { .. } if env.is_null() => {}
        Kind::Scalar { .. } => push(Item::problem(
            None,
            at(env.line),
            "`environment:` is neither a list nor a mapping; fix it and re-run",
        )),
    }
}
