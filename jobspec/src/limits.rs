//! Limits a job file must keep before the YAML parser sees it.
//!
//! A job file comes from any client holding a token, and the coordinator parses it. The YAML
//! parser's cost grows faster than linearly with nesting depth, and aliases can expand a small
//! file into a huge value, so [`check`] rejects, in one linear pass over the text:
//! - files over [`MAX_BYTES`];
//! - nesting deeper than [`MAX_DEPTH`] (flow brackets plus block indentation levels);
//! - anchors and aliases (`&a`, `*a`): a job file never needs them.
//!
//! The scan is an approximation of YAML's grammar, erring on the side of counting: it may refuse
//! an absurd file that YAML would accept (say, 33 unmatched `[` inside flow scalars), never the
//! other way round for the constructs above. Errors name the limit and the line.

/// The largest job file accepted, in bytes.
pub const MAX_BYTES: usize = 64 * 1024;
/// The deepest nesting accepted: flow collections and block indentation levels together.
pub const MAX_DEPTH: usize = 32;

/// Checks the size, depth and alias limits; the error is the message (the caller names the file).
pub fn check(text: &str) -> Result<(), String> {
    if text.len() > MAX_BYTES {
        return Err(format!("the job file is {} bytes, over the limit of {MAX_BYTES} bytes", text.len()));
    }
    let mut scan = Scanner::default();
    for (i, line) in text.lines().enumerate() {
        // The YAML parser (libyaml) also breaks lines at a lone CR, NEL, LS and PS; a scan
        // that did not would miss the indentation after them.
        for part in line.split(['\r', '\u{85}', '\u{2028}', '\u{2029}']) {
            scan.line(part).map_err(|msg| format!("line {}: {msg}", i + 1))?;
        }
    }
    Ok(())
}

#[derive(Default)]
struct Scanner {
    /// Open flow collections (`[`, `{`), across lines.
    flow: usize,
    /// The enclosing block levels: indentation column, and whether it is a sequence.
    indents: Vec<(usize, bool)>,
    /// Inside a flow collection: the line ended inside a plain scalar (it may go on), or where
    /// a node may start.
    plain: bool,
    node_start: bool,
    /// Inside a block scalar (`|`, `>`) whose parent line is indented this much: lines indented
    /// deeper (or blank) are its text, not structure.
    block_scalar: Option<usize>,
}

fn too_deep() -> String {
    format!("nesting deeper than {MAX_DEPTH} levels (the job file limit)")
}

impl Scanner {
    fn line(&mut self, line: &str) -> Result<(), String> {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
        let blank = indent == bytes.len();
        if let Some(parent) = self.block_scalar {
            if blank || indent > parent {
                return Ok(());
            }
            self.block_scalar = None;
        }
        if blank || bytes[indent] == b'#' {
            return Ok(());
        }
        let mut col = indent;
        if self.flow == 0 {
            col = self.block_levels(bytes, indent)?;
            // A block line starts a node; a flow line goes on where the last one ended.
            (self.plain, self.node_start) = (false, true);
        }
        self.tokens(bytes, col, indent)
    }

    /// Block nesting: pops the levels this line closes, pushes its indentation and one level per
    /// compact sequence entry (`- - x`). Returns the column after the entries. A sequence may sit
    /// at its parent key's column (`a:` then `- b`) and still be a level of its own, so a level
    /// is a column and whether it is a sequence.
    fn block_levels(&mut self, bytes: &[u8], indent: usize) -> Result<usize, String> {
        while self.indents.last().is_some_and(|&(top, _)| top > indent) {
            self.indents.pop();
        }
        let mut col = indent;
        loop {
            let dash = bytes.get(col) == Some(&b'-') && matches!(bytes.get(col + 1), None | Some(b' ' | b'\t'));
            if !dash && self.indents.last() == Some(&(col, true)) {
                // A key at the column of a sequence: the sequence has ended.
                self.indents.pop();
            }
            // Same level: another entry, or another key; a sequence at its key's column is new.
            if self.indents.last() != Some(&(col, dash)) {
                self.indents.push((col, dash));
            }
            if self.indents.len() > MAX_DEPTH {
                return Err(too_deep());
            }
            if !dash {
                return Ok(col);
            }
            col += 1;
            while matches!(bytes.get(col), Some(b' ' | b'\t')) {
                col += 1;
            }
            if col >= bytes.len() {
                return Ok(col);
            }
        }
    }

    /// Flow brackets, quotes, comments, anchors and aliases from `col` to the end of the line.
    ///
    /// Indicators count only where YAML reads them as such: quotes, `&`, `*`, block scalars and
    /// (outside flow collections) `[`/`{` where a node starts (line start, after `- `, `? `,
    /// `: `, or a flow `[`, `{`, `,`); inside a plain scalar they are text. Where unsure the scan
    /// assumes plain text, so it may count a bracket YAML does not, never the other way round.
    /// Quoted scalars must end on their line: a quote carried over lines could hide structure
    /// if the scan and YAML disagreed on where it began.
    fn tokens(&mut self, bytes: &[u8], mut col: usize, indent: usize) -> Result<(), String> {
        let mut after_space = true;
        while col < bytes.len() {
            let b = bytes[col];
            col += 1;
            let next_blank = matches!(bytes.get(col), None | Some(b' ' | b'\t'));
            let next_flow = matches!(bytes.get(col), Some(b',' | b'[' | b']' | b'{' | b'}'));
            let was_space = std::mem::replace(&mut after_space, matches!(b, b' ' | b'\t'));
            if after_space {
                continue;
            }
            if b == b'#' && was_space {
                self.plain = false;
                return Ok(());
            }
            let flow = self.flow > 0;
            if self.plain {
                // A plain scalar ends at `: ` and, in a flow collection, at a flow indicator.
                // (`a:b` and `a:"x` are plain text, as in YAML.)
                let ends = (b == b':' && (next_blank || (flow && next_flow)))
                    || (flow && matches!(b, b',' | b'[' | b']' | b'{' | b'}'));
                if !ends {
                    continue;
                }
                self.plain = false;
            }
            let node_start = std::mem::replace(&mut self.node_start, false);
            match b {
                b'\'' | b'"' if node_start => col = self.skip_quoted(bytes, col, b)?,
                b'&' | b'*' if node_start => {
                    return Err("YAML anchors and aliases (`&name`, `*name`) are not allowed in job files".into());
                }
                b'[' | b'{' if node_start || flow => {
                    self.flow += 1;
                    self.node_start = true;
                    if self.flow + self.indents.len() > MAX_DEPTH {
                        return Err(too_deep());
                    }
                }
                b']' | b'}' if flow => self.flow -= 1,
                b',' if flow => self.node_start = true,
                // Not in a plain scalar, a flow `:` may be adjacent (after a quoted key or `]`).
                b':' if next_blank || flow => self.node_start = true,
                b'?' | b'-' if node_start && next_blank => self.node_start = true,
                b'|' | b'>' if node_start && !flow && is_block_header(&bytes[col..]) => {
                    self.block_scalar = Some(indent);
                    return Ok(());
                }
                // Where a tag ends depends on the context; a job file needs none.
                b'!' if node_start => return Err("YAML tags (`!name`) are not allowed in job files".into()),
                _ => self.plain = true,
            }
        }
        Ok(())
    }

    /// The column after the quoted scalar whose opening `quote` is just before `col`.
    fn skip_quoted(&self, bytes: &[u8], mut col: usize, quote: u8) -> Result<usize, String> {
        while col < bytes.len() {
            let b = bytes[col];
            col += 1;
            if quote == b'"' && b == b'\\' {
                col += 1;
            } else if b == quote {
                // `''` is an escaped quote inside a single-quoted scalar.
                if quote == b'\'' && bytes.get(col) == Some(&b'\'') {
                    col += 1;
                } else {
                    return Ok(col);
                }
            }
        }
        Err("a quoted string must end on its line (a job file limit)".into())
    }
}

/// The rest of a block scalar's header line: chomping and indentation indicators (`|-`, `>+2`),
/// then nothing or a comment.
fn is_block_header(rest: &[u8]) -> bool {
    let n = rest.iter().take_while(|b| matches!(b, b'-' | b'+' | b'0'..=b'9')).count();
    let rest = &rest[n..];
    let ws = rest.iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    ws == rest.len() || (ws > 0 && rest[ws] == b'#')
}

/// The line of the second `key` in the mapping that starts at `line`:`column` (1-based, where
/// the YAML parser reports a duplicate), or `None` when it cannot be found. The parser points
/// at the mapping; the user needs the duplicate.
pub fn duplicate_key_line(text: &str, key: &str, line: usize, column: usize) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let first = lines.get(line.checked_sub(1)?)?;
    let start = first.char_indices().nth(column.checked_sub(1)?)?.0;
    let is_key = |s: &str| {
        let s = s.trim_start();
        let rest = ["", "\"", "'"].iter().find_map(|q| s.strip_prefix(q)?.strip_prefix(key)?.strip_prefix(q));
        rest.is_some_and(|r| r.trim_start().starts_with(':'))
    };
    let mut seen = 0;
    let mut count = |n: usize| {
        seen += 1;
        (seen == 2).then_some(n + 1)
    };
    if first[start..].starts_with('{') {
        // A flow mapping: keys follow `{` or `,` at depth 1, or start a continuation line
        // (quotes are not tracked; a job file has no brackets in its keys).
        let mut depth = 0usize;
        for (n, l) in lines.iter().enumerate().skip(line - 1) {
            let from = if n == line - 1 { start } else { 0 };
            if from == 0
                && depth == 1
                && !l.trim_start().starts_with([',', '{', '}'])
                && is_key(l)
                && let Some(found) = count(n)
            {
                return Some(found);
            }
            for (i, c) in l[from..].char_indices() {
                match c {
                    '{' | '[' => depth += 1,
                    '}' | ']' => depth = depth.saturating_sub(1),
                    _ => {}
                }
                if depth == 0 {
                    return None;
                }
                if depth == 1
                    && matches!(c, '{' | ',')
                    && is_key(&l[from + i + 1..])
                    && let Some(found) = count(n)
                {
                    return Some(found);
                }
            }
        }
        return None;
    }
    // A block mapping: keys at the column of its first key; a line indented less ends it.
    // Columns are bytes here: what precedes a key on its line is spaces or `- `.
    for (n, l) in lines.iter().enumerate().skip(line - 1) {
        let content = l.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let at = if n == line - 1 { start } else { l.len() - content.len() };
        if at < start {
            return None;
        }
        if at == start
            && is_key(&l[at..])
            && let Some(found) = count(n)
        {
            return Some(found);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_files_pass() {
        let ok = [
            "name: t\nmodel: { init: m }\ndata: { train: d/train[1].jsonl }\n",
            "a:\n  b:\n    - x\n    - - y\n      - z\n  c: 'it''s [ { & *'\n",
            "a: \"one line [[[[ \\\" &x\"\nb: c # [[[[ &x *y\nc: x \"[[[[ &x\nd: [a b, 'c [[', \"d\"]\n",
            "a: |\n  [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n    &x *y\nb: x*y&z\n",
            "metrics: [bleu, rouge]\nx: {a: [1, {b: 2}]}\n",
        ];
        for text in ok {
            assert_eq!(check(text), Ok(()), "{text}");
        }
    }

    #[test]
    fn floods_and_aliases_are_refused_naming_the_line() {
        let flood = format!("name: t\nx: {}{}\n", "[".repeat(30_000), "]".repeat(30_000));
        let e = check(&flood).unwrap_err();
        assert!(e.starts_with("line 2: nesting deeper than 32 levels"), "{e}");
        let braces = format!("name: {}\n", "{a: ".repeat(40));
        assert!(check(&braces).unwrap_err().contains("deeper than 32"));
        let mut block = String::new();
        for i in 0..40 {
            block.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
        }
        assert!(check(&block).unwrap_err().starts_with("line 33: nesting deeper"));
        // A sequence at its key's column is a level of its own: 20 lines nest 40 deep.
        let mut same_column = String::from("a:\n");
        for i in 0..20 {
            same_column.push_str(&format!("{}- k{i}:\n", "  ".repeat(i)));
        }
        assert!(check(&same_column).unwrap_err().starts_with("line 17: nesting deeper"), "{same_column}");
        // Lone CRs and Unicode line separators break lines for YAML too.
        for sep in ["\r", "\u{85}", "\u{2028}", "\u{2029}"] {
            let text: String = (0..40).map(|i| format!("{}k{i}:{sep}", " ".repeat(i))).collect();
            assert!(check(&text).unwrap_err().starts_with("line 1: nesting deeper"), "{sep:?}");
        }
        let dashes = format!("a:\n  {}x\n", "- ".repeat(40));
        assert!(check(&dashes).unwrap_err().starts_with("line 2: nesting deeper"));
        let e = check("name: t\nbase: &b { x: 1 }\nother: *b\n").unwrap_err();
        assert!(e.starts_with("line 2: YAML anchors and aliases"), "{e}");
        assert!(check("a: [*b]\n").unwrap_err().contains("anchors and aliases"));
        // Where YAML reads a quote as plain text, the brackets after it still count.
        let deep = "[".repeat(40);
        for text in [
            format!("x: [a:\"{deep}\"]\n"),
            format!("x: [a \"{deep}\n"),
            format!("x: [a,\n  b \"{deep}\"]\n"),
            format!("x: [?\"{deep}\"]\n"),
        ] {
            assert!(check(&text).unwrap_err().contains("nesting deeper"), "{text}");
        }
        // A quote left open at the end of its line could hide the rest of the file.
        let e = check(&format!("a: x\n  \"\nb: {deep}\n")).unwrap_err();
        assert!(e.starts_with("line 2: a quoted string must end on its line"), "{e}");
        assert!(check("a: !!str x\n").unwrap_err().contains("tags"));
        let big = format!("name: t\n#{}\n", "x".repeat(MAX_BYTES));
        assert!(check(&big).unwrap_err().contains("over the limit of 65536 bytes"));
    }
}
