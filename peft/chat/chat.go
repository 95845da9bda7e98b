// Package chat formats conversations as a chat model expects them, with the Jinja2 chat template
// its tokenizer_config.json (or chat_template.jinja) ships, and finds which tokens of the result
// are the assistant's: those a fine-tune trains on, the rest being masked.
//
// Templates render as Hugging Face transformers' apply_chat_template renders them: Jinja2 with
// trim_blocks and lstrip_blocks, the variables messages, add_generation_prompt, tools (none) and
// the tokenizer's special tokens by name (bos_token, eos_token, ...), and the functions
// raise_exception (an error here) and strftime_now (reading Options.Now). The engine is
// github.com/ardanlabs/jinja, a pure-Go Jinja written for LLM chat templates with transformers'
// defaults; scripts/chat_reference.py renders the same templates with Python's jinja2 configured
// as transformers configures it, and the tests require the same text byte for byte.
//
//	tmpl, err := chat.Load(modelDir)
//	r, err := tmpl.RenderSpans(messages, chat.Options{})
//	toks, err := r.Encode(tok)   // toks.IDs, toks.Mask(): true on the assistant's tokens
package chat

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"peft/peft/files"
	"strings"
	"time"

	"github.com/ardanlabs/jinja"
)

// Message is one turn of a conversation.
type Message struct {
	// Role is "system", "user" or "assistant" (templates may know others, such as "tool").
	Role string `json:"role"`
	// Content is the turn's text.
	Content string `json:"content"`
}

// Options are what a rendering passes to the template besides the messages.
type Options struct {
	// AddGenerationPrompt ends the text with the header of an assistant turn, so that the model
	// continues as the assistant (transformers' add_generation_prompt).
	AddGenerationPrompt bool
	// Variables are further template variables, such as Llama 3's date_string or Qwen3's
	// enable_thinking. Maps are passed with their keys in sorted order.
	Variables map[string]any
	// Now is the time strftime_now formats (Llama 3.x writes today's date with it); zero means
	// the time of the call.
	Now time.Time
}

// Template is a compiled chat template with the special tokens it is rendered with. It is safe
// for concurrent use.
type Template struct {
	compiled *jinja.Template
	special  map[string]string
}

// Files a model folder keeps its chat template in: transformers since v4.50 writes the template
// to chat_template.jinja, before that into tokenizer_config.json, which also holds the special
// tokens.
const (
	TemplateFile        = "chat_template.jinja"
	TokenizerConfigFile = "tokenizer_config.json"
)

// specialTokenNames are the tokenizer_config.json fields passed to the template by name, as
// transformers passes its special_tokens_map.
var specialTokenNames = []string{"bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"}

// Parse compiles a chat template's Jinja source. special maps the names the template knows the
// tokenizer's special tokens by (bos_token, eos_token, ...) to their text.
func Parse(source string, special map[string]string) (*Template, error) {
	compiled, err := jinja.Compile(source)
	if err != nil {
		return nil, fmt.Errorf("chat template: %w", err)
	}
	t := &Template{compiled: compiled, special: map[string]string{}}
	for k, v := range special {
		t.special[k] = v
	}
	return t, nil
}

// Load reads the chat template of the model folder dir (see LoadFS).
func Load(dir string) (*Template, error) {
	t, err := LoadFS(os.DirFS(dir))
	if err != nil {
		return nil, fmt.Errorf("%w (in %s)", err, dir)
	}
	return t, nil
}

// LoadFS reads the chat template of a model folder: chat_template.jinja where there is one,
// else tokenizer_config.json's chat_template (a string, or a list of named templates of which
// the one named "default" is used), with the special tokens tokenizer_config.json names (a
// string, or an object with "content" as older files write them). A folder without a template
// is an error.
func LoadFS(fsys fs.FS) (*Template, error) {
	var cfg struct {
		ChatTemplate json.RawMessage `json:"chat_template"`
	}
	special := map[string]string{}
	configData, err := readFile(fsys, TokenizerConfigFile)
	switch {
	case err == nil:
		if err := json.Unmarshal(configData, &cfg); err != nil {
			return nil, fmt.Errorf("chat: %s: %w", TokenizerConfigFile, err)
		}
		var fields map[string]json.RawMessage
		if err := json.Unmarshal(configData, &fields); err != nil {
			return nil, fmt.Errorf("chat: %s: %w", TokenizerConfigFile, err)
		}
		for _, name := range specialTokenNames {
			raw, ok := fields[name]
			if !ok {
				continue
			}
			text, err := tokenText(raw)
			if err != nil {
				return nil, fmt.Errorf("chat: %s: field %s: %w", TokenizerConfigFile, name, err)
			}
			if text != "" {
				special[name] = text
			}
		}
	case !errors.Is(err, fs.ErrNotExist):
		return nil, err
	}
	source, err := readFile(fsys, TemplateFile)
	switch {
	case err == nil:
		return Parse(string(source), special)
	case !errors.Is(err, fs.ErrNotExist):
		return nil, err
	}
	if configData == nil {
		return nil, fmt.Errorf("chat: no %s and no %s", TemplateFile, TokenizerConfigFile)
	}
	text, err := templateText(cfg.ChatTemplate)
	if err != nil {
		return nil, fmt.Errorf("chat: %s: field chat_template: %w", TokenizerConfigFile, err)
	}
	return Parse(text, special)
}

// templateText is chat_template's source: a string, or the "default" of a list of
// {"name", "template"}.
func templateText(raw json.RawMessage) (string, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return "", errors.New("the model has no chat template (a base model?)")
	}
	var text string
	if err := json.Unmarshal(raw, &text); err == nil {
		return text, nil
	}
	var named []struct {
		Name     string `json:"name"`
		Template string `json:"template"`
	}
	if err := json.Unmarshal(raw, &named); err != nil {
		return "", errors.New("neither a string nor a list of {name, template}")
	}
	var names []string
	for _, n := range named {
		if n.Name == "default" {
			return n.Template, nil
		}
		names = append(names, n.Name)
	}
	return "", fmt.Errorf("no template named \"default\" among %q", names)
}

// tokenText is a special token's text: a string, null, or {"content": ...}.
func tokenText(raw json.RawMessage) (string, error) {
	if string(raw) == "null" {
		return "", nil
	}
	var text string
	if err := json.Unmarshal(raw, &text); err == nil {
		return text, nil
	}
	var added struct {
		Content *string `json:"content"`
	}
	if err := json.Unmarshal(raw, &added); err != nil || added.Content == nil {
		return "", errors.New(`neither a string nor an object with "content"`)
	}
	return *added.Content, nil
}

// readFile reads name from fsys, a regular file of the folder of at most files.MaxConfig bytes.
func readFile(fsys fs.FS, name string) ([]byte, error) {
	data, err := files.Read(fsys, name, files.MaxConfig)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("chat: %w", err)
	}
	return data, err
}

// SpecialToken is the text of the special token the template knows by name ("eos_token", say),
// or "" when the tokenizer names none.
func (t *Template) SpecialToken(name string) string { return t.special[name] }

// Render formats msgs with the template.
func (t *Template) Render(msgs []Message, opts Options) (string, error) {
	if opts.Now.IsZero() {
		opts.Now = time.Now()
	}
	return t.render(msgs, opts.AddGenerationPrompt, opts)
}

// render renders msgs; every rendering of one conversation shares opts.Now.
func (t *Template) render(msgs []Message, addGenerationPrompt bool, opts Options) (text string, err error) {
	for i, m := range msgs {
		if m.Role == "" {
			return "", fmt.Errorf("chat: message %d has no role", i)
		}
	}
	data := make(map[string]jinja.Value, len(t.special)+len(opts.Variables)+4)
	for k, v := range t.special {
		data[k] = jinja.NewString(v)
	}
	for k, v := range opts.Variables {
		data[k] = jinja.FromGoValue(v)
	}
	messages := make([]jinja.Value, len(msgs))
	for i, m := range msgs {
		d := jinja.NewDict() // in transformers' key order, which tojson keeps
		d.AsDict().Set("role", jinja.NewString(m.Role))
		d.AsDict().Set("content", jinja.NewString(m.Content))
		messages[i] = d
	}
	data["messages"] = jinja.NewList(messages)
	data["add_generation_prompt"] = jinja.NewBool(addGenerationPrompt)
	if _, ok := data["tools"]; !ok {
		data["tools"] = jinja.None()
	}
	now := opts.Now
	data["strftime_now"] = jinja.NewCallable("strftime_now", func(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
		if len(args) != 1 || !args[0].IsString() {
			return jinja.Value{}, errors.New("strftime_now takes one format string")
		}
		s, err := strftime(now, args[0].AsString())
		return jinja.NewString(s), err
	})
	// The engine is third-party code running a template from a file: a panic in it is a bad
	// template (or an engine bug), reported as an error rather than taking the program down.
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("chat template: the engine failed: %v", r)
		}
	}()
	text, err = t.compiled.RenderValues(data)
	if err != nil {
		return "", fmt.Errorf("chat template: %w", err)
	}
	return text, nil
}

// strftime formats t with the C/Python strftime directives chat templates use.
func strftime(t time.Time, format string) (string, error) {
	var b strings.Builder
	for i := 0; i < len(format); i++ {
		if format[i] != '%' || i+1 == len(format) {
			b.WriteByte(format[i])
			continue
		}
		i++
		switch format[i] {
		case 'd':
			fmt.Fprintf(&b, "%02d", t.Day())
		case 'm':
			fmt.Fprintf(&b, "%02d", int(t.Month()))
		case 'Y':
			fmt.Fprintf(&b, "%04d", t.Year())
		case 'y':
			fmt.Fprintf(&b, "%02d", t.Year()%100)
		case 'H':
			fmt.Fprintf(&b, "%02d", t.Hour())
		case 'M':
			fmt.Fprintf(&b, "%02d", t.Minute())
		case 'S':
			fmt.Fprintf(&b, "%02d", t.Second())
		case 'b':
			b.WriteString(t.Format("Jan"))
		case 'B':
			b.WriteString(t.Format("January"))
		case 'a':
			b.WriteString(t.Format("Mon"))
		case 'A':
			b.WriteString(t.Format("Monday"))
		case '%':
			b.WriteByte('%')
		default:
			return "", fmt.Errorf("strftime_now: directive %%%c is not supported", format[i])
		}
	}
	return b.String(), nil
}
