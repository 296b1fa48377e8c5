/*
 * Reads METEOR 1.5 `SCORE ||| ref ||| ... ||| hypothesis` lines and writes the words of every reference, as METEOR's
 * scorer sees them under `-l <language> -norm`, as ids into the paraphrase index's word list.
 *
 * Why a helper of our own: METEOR's scorer normalises each reference with Normalizer.normalizeLine(line, langID,
 * true), lower-cases it (MeteorScorer.getMeteorStats, normalization level 2 = `-norm`) and splits it into words
 * with java.util.StringTokenizer (Alignment), but exposes those words only through its alignment file, which costs
 * an alignment per line. lavis_ext needs them to cut the paraphrase table down to the phrases the references
 * contain (lavis_ext/evaluation/meteor_paraphrases.py), and only METEOR's own code gives them exactly. Compiled
 * once against meteor-1.5.jar into the cache directory.
 *
 * Called by CaptionTextServer (a NORM request), which keeps one JVM per Python process:
 *   MeteorNormalize.normalize(language, words.txt, score_lines.txt, ids.bin)
 *   words.txt: UTF-8, one word per line, line i is word id i (read once per path and kept).
 *   ids.bin: big-endian int32 per word (-1 for a word not in the list), then -1 after each reference.
 */
import java.io.BufferedOutputStream;
import java.io.BufferedReader;
import java.io.DataOutputStream;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.HashMap;
import java.util.StringTokenizer;

import edu.cmu.meteor.scorer.MeteorConfiguration;
import edu.cmu.meteor.util.Normalizer;

public class MeteorNormalize {
    private static final int NO_WORD = -1;
    private static String wordsPath;
    private static HashMap<String, Integer> ids;

    public static void normalize(String language, String wordsFile, String input, String output) throws IOException {
        MeteorConfiguration config = new MeteorConfiguration();
        config.setLanguage(language);  // as `-l <language>` does
        int langID = config.getLangID();
        HashMap<String, Integer> ids = wordIds(wordsFile);

        try (BufferedReader in = new BufferedReader(
                     new InputStreamReader(new FileInputStream(input), StandardCharsets.UTF_8));
             DataOutputStream out = new DataOutputStream(new BufferedOutputStream(new FileOutputStream(output), 1 << 16))) {
            String line;
            while ((line = in.readLine()) != null) {
                // The same split and trim as Meteor's -stdio SCORE command: parts 1..n-2 are the references.
                String[] parts = line.split("\\|\\|\\|");
                for (int i = 1; i < parts.length - 1; i++) {
                    String words = Normalizer.normalizeLine(parts[i].trim(), langID, true).toLowerCase();
                    StringTokenizer tokens = new StringTokenizer(words);
                    while (tokens.hasMoreTokens()) {
                        Integer id = ids.get(tokens.nextToken());
                        out.writeInt(id == null ? NO_WORD : id);
                    }
                    out.writeInt(NO_WORD);
                }
            }
        }
    }

    /** The word list's ids, read once per path (the index's word list does not change while it is in use). */
    private static synchronized HashMap<String, Integer> wordIds(String wordsFile) throws IOException {
        if (!wordsFile.equals(wordsPath)) {
            HashMap<String, Integer> read = new HashMap<>();
            try (BufferedReader words = new BufferedReader(
                    new InputStreamReader(new FileInputStream(wordsFile), StandardCharsets.UTF_8))) {
                String word;
                while ((word = words.readLine()) != null) {
                    read.put(word, read.size());
                }
            }
            ids = read;
            wordsPath = wordsFile;
        }
        return ids;
    }
}
