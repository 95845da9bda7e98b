// Package files reads the files of a model or adapter folder as untrusted input: only regular
// files of the folder (a device, a FIFO, or a link out of the folder is refused before anything
// is opened), and at most a given size, checked before the read. Every loader of the SDK reads
// through it.
package files

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// Limits on what a file may hold, checked before it is read.
const (
	// MaxConfig bounds JSON configuration files (config.json, adapter_config.json, index files,
	// tokenizer_config.json).
	MaxConfig = 32 << 20
	// MaxTokenizer bounds tokenizer.json (Llama 3's is 9 MB, the largest real ones ~30 MB).
	MaxTokenizer = 128 << 20
	// Any lets a file be as large as it is (weights: the safetensors parser checks the rest).
	Any = -1
)

// maxLinks bounds a chain of symbolic links.
const maxLinks = 8

// Check returns an error unless name is a regular file of fsys's folder: a symbolic link must
// stay inside the folder at every step, except into a Hugging Face cache's blobs (its
// snapshots/<revision>/ folders link each file to ../../blobs/<hash>).
func Check(fsys fs.FS, name string) error {
	current := name
	for range maxLinks {
		info, err := fs.Lstat(fsys, current)
		if errors.Is(err, errors.ErrUnsupported) {
			info, err = fs.Stat(fsys, current) // a file system without links (an embedded one)
		}
		if err != nil {
			return err
		}
		if info.Mode()&fs.ModeSymlink == 0 {
			if !info.Mode().IsRegular() {
				return fmt.Errorf("%s is not a regular file (%s)", name, info.Mode())
			}
			return nil
		}
		target, err := fs.ReadLink(fsys, current)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if strings.HasPrefix(target, "../../blobs/") && path.Dir(current) == "." && fs.ValidPath(strings.TrimPrefix(target, "../../")) {
			return checkBlob(fsys, name, target)
		}
		next := path.Join(path.Dir(current), target)
		if path.IsAbs(target) || !fs.ValidPath(next) {
			return fmt.Errorf("%s is a symbolic link out of the folder (to %s)", name, target)
		}
		current = next
	}
	return fmt.Errorf("%s: more than %d symbolic links in a row", name, maxLinks)
}

// checkBlob checks a Hugging Face cache link: the blob must be a regular file. Only os.DirFS
// folders have a cache around them; the blob is reached through the link itself.
func checkBlob(fsys fs.FS, name, target string) error {
	info, err := fs.Stat(fsys, name)
	if err != nil {
		return fmt.Errorf("%s (to %s): %w", name, target, err)
	}
	if !info.Mode().IsRegular() {
		return fmt.Errorf("%s (to %s) is not a regular file (%s)", name, target, info.Mode())
	}
	return nil
}

// Read reads name from fsys after Check, refusing more than limit bytes (Any: no limit) before
// reading them.
func Read(fsys fs.FS, name string, limit int64) ([]byte, error) {
	if err := Check(fsys, name); err != nil {
		return nil, err
	}
	f, err := fsys.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !info.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file (%s)", name, info.Mode())
	}
	if limit >= 0 && info.Size() > limit {
		return nil, fmt.Errorf("%s has %d bytes, over the limit of %d for this file", name, info.Size(), limit)
	}
	r := io.Reader(f)
	if limit >= 0 {
		r = io.LimitReader(f, limit+1)
	}
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if limit >= 0 && int64(len(data)) > limit {
		return nil, fmt.Errorf("%s grew past the limit of %d bytes while read", name, limit)
	}
	return data, nil
}

// ReadPath is Read for a file path: the file's folder is the folder it must stay in.
func ReadPath(p string, limit int64) ([]byte, error) {
	dir, name := filepath.Split(filepath.Clean(p))
	if dir == "" {
		dir = "."
	}
	return Read(os.DirFS(dir), name, limit)
}

// IndexFile lists the shards of a checkpoint saved in several files.
const IndexFile = "model.safetensors.index.json"

// Shards returns the weight files of a Hugging Face model folder: model.safetensors, or the
// shards IndexFile's weight_map names (each once, sorted), which must be files of the folder.
func Shards(fsys fs.FS) ([]string, error) {
	index, err := Read(fsys, IndexFile, MaxConfig)
	if errors.Is(err, fs.ErrNotExist) {
		return []string{"model.safetensors"}, nil
	}
	if err != nil {
		return nil, err
	}
	var idx struct {
		WeightMap map[string]string `json:"weight_map"`
	}
	if err := json.Unmarshal(index, &idx); err != nil {
		return nil, fmt.Errorf("%s: %w", IndexFile, err)
	}
	seen := map[string]bool{}
	var shards []string
	for _, file := range idx.WeightMap {
		if path.Base(file) != file || file == "." || file == ".." {
			return nil, fmt.Errorf("%s names a shard outside the folder: %q", IndexFile, file)
		}
		if !seen[file] {
			seen[file] = true
			shards = append(shards, file)
		}
	}
	if len(shards) == 0 {
		return nil, fmt.Errorf("%s lists no shards", IndexFile)
	}
	sort.Strings(shards)
	return shards, nil
}
