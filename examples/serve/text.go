package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"

	"peft/peft/chat"
	"peft/peft/llama"
	"peft/peft/tokenizer"
)

// plainTemplate is the chat template of a model that has none (stories260K): one line per turn,
// "role: content", after the BOS token, ending with "assistant:" for the reply.
const plainTemplate = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" +
	"{% if add_generation_prompt %}assistant:{% endif %}"

// textModel turns text into the base model's token ids and back, as examples/generate does:
// completions are encoded with the tokenizer's post-processor (Llama's <s>), chats are rendered
// with the chat template and encoded as the template writes them; generation stops at the
// model's end-of-sequence ids and the tokenizer's </s>, and for chats also at the template's
// eos_token (the end of an assistant turn).
type textModel struct {
	tok      *tokenizer.Tokenizer
	template *chat.Template
	// builtinTemplate is true when template is plainTemplate (the model has none).
	builtinTemplate bool
	vocab           int
	stopIDs         []int // completions'
	chatStopIDs     []int // chats'
}

// loadText reads the tokenizer and chat template of the model folder fsys (named name in
// errors), whose config is cfg; a model without a chat template gets plainTemplate.
func loadText(fsys fs.FS, name string, cfg llama.Config) (*textModel, error) {
	data, err := fs.ReadFile(fsys, "tokenizer.json")
	if err != nil {
		return nil, fmt.Errorf("model %s: %w", name, err)
	}
	tok, err := tokenizer.Parse(data)
	if err != nil {
		return nil, fmt.Errorf("model %s: %w", name, err)
	}
	t := &textModel{tok: tok, vocab: cfg.VocabSize}
	t.stopIDs = addStop(slices.Clone([]int(cfg.EOSTokenIDs)), tok.EOS())
	has, err := hasTemplate(fsys)
	if err != nil {
		return nil, fmt.Errorf("model %s: %w", name, err)
	}
	if has {
		t.template, err = chat.LoadFS(fsys)
	} else {
		special := map[string]string{}
		for key, id := range map[string]int{"bos_token": tok.BOS(), "eos_token": tok.EOS()} {
			if id >= 0 {
				special[key] = tok.IDToken(id)
			}
		}
		t.builtinTemplate = true
		t.template, err = chat.Parse(plainTemplate, special)
	}
	if err != nil {
		return nil, fmt.Errorf("model %s: %w", name, err)
	}
	t.chatStopIDs = slices.Clone(t.stopIDs)
	if id, ok := tok.TokenID(t.template.SpecialToken("eos_token")); ok {
		t.chatStopIDs = addStop(t.chatStopIDs, id)
	}
	return t, nil
}

// hasTemplate tells whether the model folder has a chat template: chat_template.jinja, or a
// chat_template in tokenizer_config.json (what chat.LoadFS reads).
func hasTemplate(fsys fs.FS) (bool, error) {
	if _, err := fs.Stat(fsys, chat.TemplateFile); err == nil {
		return true, nil
	}
	data, err := fs.ReadFile(fsys, chat.TokenizerConfigFile)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	var cfg struct {
		ChatTemplate json.RawMessage `json:"chat_template"`
	}
	if err := json.Unmarshal(data, &cfg); err != nil {
		return false, fmt.Errorf("%s: %w", chat.TokenizerConfigFile, err)
	}
	return len(cfg.ChatTemplate) > 0 && string(cfg.ChatTemplate) != "null", nil
}

// addStop appends id to ids unless it is negative (the tokenizer has no such token) or there.
func addStop(ids []int, id int) []int {
	if id >= 0 && !slices.Contains(ids, id) {
		ids = append(ids, id)
	}
	return ids
}

// decode is the text of ids, special tokens skipped.
func (t *textModel) decode(ids []int) string { return t.tok.Decode(ids, true) }

// encode tokenizes a completion's prompt as the tokenizer's post-processor has it.
func (t *textModel) encode(prompt string) ([]int, error) {
	return t.checked(t.tok.Encode(prompt), "prompt")
}

// encodeChat renders msgs with the chat template, ending with the assistant's header, and
// tokenizes the text as the template writes it (no BOS beyond the template's).
func (t *textModel) encodeChat(msgs []chat.Message) ([]int, error) {
	text, err := t.template.Render(msgs, chat.Options{AddGenerationPrompt: true})
	if err != nil {
		return nil, err
	}
	return t.checked(t.tok.EncodeNoSpecial(text), "messages")
}

// checked rejects a prompt with no ids or ids beyond the model's vocabulary (a tokenizer.json
// that is not the model's).
func (t *textModel) checked(ids []int, field string) ([]int, error) {
	if len(ids) == 0 {
		return nil, fmt.Errorf("%s: the text has no tokens", field)
	}
	for _, id := range ids {
		if id >= t.vocab {
			return nil, fmt.Errorf("the tokenizer gives id %d (%q), beyond the model's vocab_size %d: tokenizer.json is not this model's", id, t.tok.IDToken(id), t.vocab)
		}
	}
	return ids, nil
}

// continuation is the text that ids add after prompt: the decoding of both (special tokens
// skipped) less before, the prompt's (decode(prompt)), so that a word's leading space survives,
// as it would not in the decoding of ids alone.
func (t *textModel) continuation(before string, prompt, ids []int) string {
	all := t.tok.Decode(append(slices.Clone(prompt), ids...), true)
	if rest, ok := strings.CutPrefix(all, before); ok {
		return rest
	}
	return t.tok.Decode(ids, true)
}
