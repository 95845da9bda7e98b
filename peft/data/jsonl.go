// Package data turns a user's JSONL files into training batches for a causal language model:
// it reads the three forms fine-tuning tools share (MLX-LM's, TRL's), tokenizes them, masks the
// loss to the part the model should learn to write, and cuts, pads, shuffles and optionally
// packs them into rows.
//
//	{"text": "..."}                                   the loss covers every token
//	{"prompt": "...", "completion": "..."}            the loss covers the completion (and EOS)
//	{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
//	                                                  formatted with the model's chat template;
//	                                                  the loss covers the assistant turns
//
// A file holds one form. Blank lines are skipped; any other line that is not one of the forms
// is an error naming the file and the line, and nothing is dropped without being counted in
// Stats. Batches are peft.Batch values for llama.CausalLM with peft.NextTokenLoss: inputs are
// token ids and the attention mask [batch, seq] (int32, right padding), labels the same two and
// the loss mask.
package data

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"peft/peft/chat"
)

// Format is the form of a JSONL file's lines.
type Format string

const (
	// Text lines are {"text": ...}.
	Text Format = "text"
	// PromptCompletion lines are {"prompt": ..., "completion": ...}.
	PromptCompletion Format = "prompt_completion"
	// Chat lines are {"messages": [{"role": ..., "content": ...}, ...]}.
	Chat Format = "chat"
)

// Record is one line of a JSONL file.
type Record struct {
	// Line is the line number in the file, from 1.
	Line int
	// Text is a Text record's text.
	Text string
	// Prompt and Completion are a PromptCompletion record's.
	Prompt, Completion string
	// Messages are a Chat record's turns.
	Messages []chat.Message
}

// File is the records of a JSONL file, all of one Format.
type File struct {
	// Name is the file's path (or the name given to ParseJSONL), for error messages.
	Name    string
	Format  Format
	Records []Record
}

// maxLineBytes bounds one line (a long document or conversation is a few MB at most).
const maxLineBytes = 64 << 20

// ReadJSONL reads a JSONL file (see ParseJSONL).
func ReadJSONL(path string) (*File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("data: %w", err)
	}
	defer f.Close()
	return ParseJSONL(path, f)
}

// ParseJSONL reads JSONL from r; name names it in errors. Each line is a JSON object of one of
// the three forms (other fields, such as an "id", are ignored); the first record fixes the
// file's form. An empty file is an error.
func ParseJSONL(name string, r io.Reader) (*File, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), maxLineBytes)
	file := &File{Name: name}
	line := 0
	for sc.Scan() {
		line++
		text := sc.Bytes()
		if line == 1 {
			text = bytes.TrimPrefix(text, []byte("\xef\xbb\xbf")) // a UTF-8 byte-order mark, as some editors write
		}
		text = bytes.TrimSpace(text)
		if len(text) == 0 {
			continue
		}
		rec, format, err := parseRecord(text)
		if err != nil {
			return nil, fmt.Errorf("data: %s:%d: %w", name, line, err)
		}
		if file.Format == "" {
			file.Format = format
		} else if format != file.Format {
			return nil, fmt.Errorf("data: %s:%d: a %s record in a file of %s records (line %d)", name, line, format, file.Format, file.Records[0].Line)
		}
		rec.Line = line
		file.Records = append(file.Records, rec)
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return nil, fmt.Errorf("data: %s:%d: a line longer than %d bytes", name, line+1, maxLineBytes)
		}
		return nil, fmt.Errorf("data: %s: %w", name, err)
	}
	if len(file.Records) == 0 {
		return nil, fmt.Errorf("data: %s has no records", name)
	}
	return file, nil
}

// parseRecord reads one line's object.
func parseRecord(line []byte) (Record, Format, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(line, &fields); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return Record{}, "", fmt.Errorf("not a JSON object but a JSON %s", typeErr.Value)
		}
		return Record{}, "", fmt.Errorf("not a JSON object: %w", err)
	}
	_, hasText := fields["text"]
	_, hasPrompt := fields["prompt"]
	_, hasCompletion := fields["completion"]
	_, hasMessages := fields["messages"]
	forms := 0
	for _, has := range []bool{hasText, hasPrompt || hasCompletion, hasMessages} {
		if has {
			forms++
		}
	}
	switch {
	case forms == 0:
		return Record{}, "", errors.New(`no "text", "prompt"/"completion" or "messages" field`)
	case forms > 1:
		return Record{}, "", errors.New(`fields of more than one form ("text", "prompt"/"completion", "messages"): give one`)
	case hasText:
		text, err := stringField(fields, "text", false)
		return Record{Text: text}, Text, err
	case hasMessages:
		msgs, err := messagesField(fields["messages"])
		return Record{Messages: msgs}, Chat, err
	}
	if !hasCompletion || !hasPrompt {
		missing := "completion"
		if !hasPrompt {
			missing = "prompt"
		}
		return Record{}, "", fmt.Errorf("a prompt/completion record without %q", missing)
	}
	prompt, err := stringField(fields, "prompt", true)
	if err != nil {
		return Record{}, "", err
	}
	completion, err := stringField(fields, "completion", false)
	return Record{Prompt: prompt, Completion: completion}, PromptCompletion, err
}

// stringField reads fields[name] as a string, non-empty unless emptyOK.
func stringField(fields map[string]json.RawMessage, name string, emptyOK bool) (string, error) {
	raw, ok := fields[name]
	if !ok {
		return "", fmt.Errorf("no field %q", name)
	}
	if string(raw) == "null" {
		return "", fmt.Errorf("field %q is null, not a string", name)
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", fmt.Errorf("field %q is not a string", name)
	}
	if !emptyOK && strings.TrimSpace(s) == "" {
		return "", fmt.Errorf("field %q is empty", name)
	}
	return s, nil
}

// messagesField reads a chat record's turns: objects with a non-empty string role and a
// string content, at least one of them the assistant's (the turns the loss covers).
func messagesField(raw json.RawMessage) ([]chat.Message, error) {
	var items []map[string]json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil {
		return nil, errors.New(`field "messages" is not a list of objects`)
	}
	if len(items) == 0 {
		return nil, errors.New(`field "messages" is empty`)
	}
	msgs := make([]chat.Message, len(items))
	assistant := false
	for i, item := range items {
		role, err := stringField(item, "role", false)
		if err != nil {
			return nil, fmt.Errorf("message %d: %w", i, err)
		}
		content, err := stringField(item, "content", true)
		if err != nil {
			return nil, fmt.Errorf("message %d: %w", i, err)
		}
		msgs[i] = chat.Message{Role: role, Content: content}
		assistant = assistant || role == "assistant"
	}
	if !assistant {
		return nil, errors.New("no assistant message: nothing to learn")
	}
	return msgs, nil
}
