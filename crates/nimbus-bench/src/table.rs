//! The report's model: text and tables ([`Doc`]), rendered as aligned text for people or as
//! Markdown for docs/BENCHMARKS.md, so the two reports cannot say different things.

pub use nimbus_table::Table;

/// A part of the report: text as it reads, or a table.
#[derive(Debug, Clone)]
enum Block {
    Text(String),
    Table(Table),
}

/// The report: text and tables in order.
#[derive(Debug, Clone, Default)]
pub struct Doc {
    blocks: Vec<Block>,
}

impl Doc {
    /// An empty report.
    pub fn new() -> Self {
        Doc::default()
    }

    /// Appends text (its lines end with `\n`).
    pub fn text(&mut self, text: impl Into<String>) {
        self.blocks.push(Block::Text(text.into()));
    }

    /// Appends a table.
    pub fn table(&mut self, table: Table) {
        self.blocks.push(Block::Table(table));
    }

    /// For people: tables as aligned columns.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for block in &self.blocks {
            match block {
                Block::Text(text) => out.push_str(text),
                Block::Table(table) => out.push_str(&table.text()),
            }
        }
        out
    }

    /// In Markdown: tables as Markdown tables, each set off by blank lines.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        for block in &self.blocks {
            match block {
                Block::Text(text) => out.push_str(text),
                Block::Table(table) => {
                    if !out.is_empty() && !out.ends_with("\n\n") {
                        out.push('\n');
                    }
                    out.push_str(&table.markdown());
                    out.push('\n');
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_doc_reads_as_text_and_as_markdown() {
        let mut table = Table::new(&["server", "p50"]);
        table.row(["isolated", "212 µs"]);
        table.row(["a|b", "1.25 ms"]);
        let mut doc = Doc::new();
        doc.text("Warm latency:\n");
        doc.table(table);
        doc.text("  first error: none\n");
        assert_eq!(
            doc.to_text(),
            "Warm latency:\nSERVER    P50\nisolated  212 µs\na|b       1.25 ms\n  first error: none\n"
        );
        assert_eq!(
            doc.to_markdown(),
            "Warm latency:\n\n| SERVER | P50 |\n|---|---|\n| isolated | 212 µs |\n\
             | a\\|b | 1.25 ms |\n\n  first error: none\n"
        );
    }
}
