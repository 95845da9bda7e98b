package chat_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/stretchr/testify/require"

	"peft/peft/chat"
	"peft/peft/tokenizer"
)

// reference is testdata/expected.json, written by scripts/chat_reference.py with Python's jinja2
// configured as transformers configures it.
type reference struct {
	Now   string `json:"now"`
	Cases []struct {
		Template            string            `json:"template"`
		Conversation        string            `json:"conversation"`
		Messages            []chat.Message    `json:"messages"`
		AddGenerationPrompt bool              `json:"add_generation_prompt"`
		Variables           map[string]any    `json:"variables"`
		SpecialTokens       map[string]string `json:"special_tokens"`
		Text                string            `json:"text"`
		Error               string            `json:"error"`
		AssistantSpans      [][2]int          `json:"assistant_spans"`
	} `json:"cases"`
}

func loadReference(t *testing.T) reference {
	t.Helper()
	data, err := os.ReadFile("testdata/expected.json")
	require.NoError(t, err)
	var ref reference
	require.NoError(t, json.Unmarshal(data, &ref))
	require.Len(t, ref.Cases, 35)
	return ref
}

// template compiles the named fixture: a .jinja file with the case's special tokens, or a model
// folder's tokenizer_config.json read by LoadFS.
func template(t *testing.T, name string, special map[string]string) *chat.Template {
	t.Helper()
	if dir := filepath.Join("testdata", name); dirExists(dir) {
		tmpl, err := chat.Load(dir)
		require.NoError(t, err)
		for k, v := range special {
			require.Equal(t, v, tmpl.SpecialToken(k), k)
		}
		return tmpl
	}
	src, err := os.ReadFile(filepath.Join("testdata", "templates", name+".jinja"))
	require.NoError(t, err)
	tmpl, err := chat.Parse(string(src), special)
	require.NoError(t, err)
	return tmpl
}

func dirExists(dir string) bool {
	st, err := os.Stat(dir)
	return err == nil && st.IsDir()
}

// Every template renders every conversation to jinja2's text byte for byte (or fails where the
// template raises), and the assistant turns found by rendering prefixes are where the reference
// finds them by searching the text — except where the template rewrites earlier turns (Qwen3
// on conversations that go on after an assistant turn), which RenderSpans reports.
func TestMatchesJinja2(t *testing.T) {
	ref := loadReference(t)
	now, err := time.Parse("2006-01-02T15:04:05", ref.Now)
	require.NoError(t, err)
	rewrites := map[string]bool{"qwen3/multi_turn": true, "qwen3/no_system": true}
	var texts, spans int
	for _, c := range ref.Cases {
		name := c.Template + "/" + c.Conversation
		if _, ok := c.Variables["date_string"]; !ok && c.Template == "llama3.2" {
			name += "/strftime_now"
		}
		t.Run(name, func(t *testing.T) {
			tmpl := template(t, c.Template, c.SpecialTokens)
			opts := chat.Options{AddGenerationPrompt: c.AddGenerationPrompt, Variables: c.Variables, Now: now}
			got, err := tmpl.Render(c.Messages, opts)
			if c.Error != "" {
				require.ErrorContains(t, err, c.Error)
				return
			}
			require.NoError(t, err)
			require.Equal(t, c.Text, got)
			texts++
			r, err := tmpl.RenderSpans(c.Messages, opts)
			if rewrites[c.Template+"/"+c.Conversation] {
				require.ErrorIs(t, err, chat.ErrRewritesTurns)
				if c.Messages[len(c.Messages)-1].Role == "assistant" { // its last turn still places
					last, err := tmpl.RenderLastTurn(c.Messages, opts)
					require.NoError(t, err)
					require.Equal(t, c.Text, last.Text)
					s := c.AssistantSpans[len(c.AssistantSpans)-1]
					require.Equal(t, []chat.Span{{Start: s[0], End: s[1]}}, last.Assistant)
					spans++
				}
				return
			}
			require.NoError(t, err)
			require.Equal(t, c.Text, r.Text)
			want := make([]chat.Span, len(c.AssistantSpans))
			for i, s := range c.AssistantSpans {
				want[i] = chat.Span{Start: s[0], End: s[1]}
			}
			if len(want) == 0 {
				want = nil
			}
			require.Equal(t, want, r.Assistant)
			spans += len(want)
		})
	}
	require.Equal(t, 34, texts)
	require.Equal(t, 31, spans)
}

// The assistant tokens of a conversation, on the byte-level tokenizers of the families these
// templates belong to: the tokens of the whole text, and the masked ones decode to exactly the
// assistant's spans.
func TestEncodeMasksAssistantTokens(t *testing.T) {
	ref := loadReference(t)
	tokenizers := map[string]string{"llama3.2": "llama3", "qwen2.5": "qwen2", "smollm2": "smollm2"}
	checked := 0
	for _, c := range ref.Cases {
		tokFile, ok := tokenizers[c.Template]
		if !ok || c.Conversation == "one_turn" {
			continue
		}
		t.Run(c.Template+"/"+c.Conversation, func(t *testing.T) {
			tok, err := tokenizer.Load(filepath.Join("..", "tokenizer", "testdata", "bytelevel", tokFile+".json"))
			require.NoError(t, err)
			tmpl := template(t, c.Template, c.SpecialTokens)
			r, err := tmpl.RenderSpans(c.Messages, chat.Options{AddGenerationPrompt: c.AddGenerationPrompt, Variables: c.Variables})
			require.NoError(t, err)
			toks, err := r.Encode(tok)
			require.NoError(t, err)
			require.Equal(t, tok.EncodeNoSpecial(r.Text), toks.IDs)
			require.Len(t, toks.Assistant, len(r.Assistant))
			mask := toks.Mask()
			require.Len(t, mask, len(toks.IDs))
			inside := 0
			for k, s := range toks.Assistant {
				require.Equal(t, r.Text[r.Assistant[k].Start:r.Assistant[k].End], tok.Decode(toks.IDs[s.Start:s.End], false))
				inside += s.End - s.Start
				// The turn's last token is the end-of-turn marker, the special token it stops at.
				require.True(t, tok.IsSpecial(toks.IDs[s.End-1]), "turn %d ends with %q", k, tok.IDToken(toks.IDs[s.End-1]))
			}
			n := 0
			for _, m := range mask {
				if m {
					n++
				}
			}
			require.Equal(t, inside, n)
			checked++
		})
	}
	require.Equal(t, 16, checked)
}

// A span boundary inside a token is an error naming the turn and the byte, not a guess; one
// between tokens is not.
func TestEncodeRefusesBoundaryInsideAToken(t *testing.T) {
	tok, err := tokenizer.Load(filepath.Join("..", "tokenizer", "testdata", "bytelevel", "qwen2.json"))
	require.NoError(t, err)
	const text = "<|im_start|>assistant\nThe quick brown fox jumps over the lazy dog.<|im_end|>"
	start := strings.Index(text, "The")
	inside, between := 0, 0
	for at := start; at < len(text)-len("<|im_end|>"); at++ {
		_, err := chat.Rendered{Text: text, Assistant: []chat.Span{{Start: at, End: len(text)}}}.Encode(tok)
		if err != nil {
			require.EqualError(t, err, fmt.Sprintf("chat: assistant turn 0: byte %d of the text falls inside a token", at))
			inside++
		} else {
			between++
		}
	}
	require.Greater(t, inside, 10)
	require.Greater(t, between, 5)
}

// How LoadFS finds a template: chat_template.jinja before tokenizer_config.json, a named list's
// "default", special tokens as strings or objects; and what it refuses.
func TestLoadFS(t *testing.T) {
	const src = "{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m.content }}{{ eos_token }}{% endfor %}"
	msgs := []chat.Message{{Role: "user", Content: "hi"}}
	cases := []struct {
		name    string
		files   fstest.MapFS
		want    string
		wantErr string
	}{
		{"string", files(`{"chat_template": "`+jsonEscape(src)+`", "bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": false}}`, ""), "<s>user:hi</s>", ""},
		{"named list", files(`{"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "`+jsonEscape(src)+`"}], "bos_token": null, "eos_token": "E"}`, ""), "user:hiE", ""},
		{"jinja file wins", files(`{"chat_template": "ignored", "bos_token": "B"}`, src), "Buser:hi", ""},
		{"jinja file alone", files("", src), "user:hi", ""},
		{"no template", files(`{"bos_token": "<s>"}`, ""), "", "tokenizer_config.json: field chat_template: the model has no chat template"},
		{"no default", files(`{"chat_template": [{"name": "rag", "template": "x"}]}`, ""), "", `no template named "default" among ["rag"]`},
		{"bad token", files(`{"chat_template": "x", "eos_token": 3}`, ""), "", "field eos_token: neither a string nor an object"},
		{"no files", fstest.MapFS{}, "", "no chat_template.jinja and no tokenizer_config.json"},
		{"bad syntax", files(`{"chat_template": "{% if %}"}`, ""), "", "chat template: jinja"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tmpl, err := chat.LoadFS(c.files)
			if c.wantErr != "" {
				require.ErrorContains(t, err, c.wantErr)
				return
			}
			require.NoError(t, err)
			got, err := tmpl.Render(msgs, chat.Options{})
			require.NoError(t, err)
			require.Equal(t, c.want, got)
		})
	}
}

func files(config, jinjaSrc string) fstest.MapFS {
	fsys := fstest.MapFS{}
	if config != "" {
		fsys[chat.TokenizerConfigFile] = &fstest.MapFile{Data: []byte(config)}
	}
	if jinjaSrc != "" {
		fsys[chat.TemplateFile] = &fstest.MapFile{Data: []byte(jinjaSrc)}
	}
	return fsys
}

func jsonEscape(s string) string {
	b, _ := json.Marshal(s)
	return string(b[1 : len(b)-1])
}

// strftime_now formats Options.Now with Python's directives; an unsupported directive and a
// message without a role are errors.
func TestStrftimeNowAndErrors(t *testing.T) {
	tmpl, err := chat.Parse(`{{ strftime_now("%A %d %B %Y, %H:%M:%S %% %a %b %y %m") }}`, nil)
	require.NoError(t, err)
	got, err := tmpl.Render(nil, chat.Options{Now: time.Date(2024, 7, 26, 8, 5, 9, 0, time.UTC)})
	require.NoError(t, err)
	require.Equal(t, "Friday 26 July 2024, 08:05:09 % Fri Jul 24 07", got)

	tmpl, err = chat.Parse(`{{ strftime_now("%j") }}`, nil)
	require.NoError(t, err)
	_, err = tmpl.Render(nil, chat.Options{})
	require.ErrorContains(t, err, "directive %j is not supported")

	_, err = tmpl.Render([]chat.Message{{Content: "x"}}, chat.Options{})
	require.ErrorContains(t, err, "message 0 has no role")
}
