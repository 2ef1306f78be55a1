// Parse AsyncAPI documents with the official parser (@asyncapi/parser) and print, as one
// JSON object on stdout, each file's diagnostics: {"file": [{"severity", "code", "message", "path"}]}.
// Severity as the parser's: 0 error, 1 warning, 2 information, 3 hint.
// Usage: node validate.mjs FILE...   (one process for every document: the parser loads once)
import { readFile } from 'node:fs/promises';
import { Parser } from '@asyncapi/parser';

const parser = new Parser();
const results = {};
for (const file of process.argv.slice(2)) {
  const text = await readFile(file, 'utf8');
  const { diagnostics } = await parser.parse(text, { source: file });
  results[file] = diagnostics.map((d) => ({
    severity: d.severity, code: String(d.code), message: d.message, path: (d.path || []).join('/'),
  }));
}
process.stdout.write(JSON.stringify(results));
